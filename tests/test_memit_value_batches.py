"""MEMIT's target values are optimised a few requests at a time: the default batch follows the device,
and the batch size changes memory and speed only, never the result."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model_and_tokenizer

from peft_edit import EditRequest, MemitConfig
from peft_edit.tuners.memit.algorithm import RequestRows, compute_deltas
from peft_edit.tuners.memit.config import ACCELERATOR_VALUE_BATCH, CPU_VALUE_BATCH
from peft_edit.tuners.per_model import context_templates

REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
    EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Paris"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
]


def test_default_batch_is_small_on_the_cpu_and_larger_on_an_accelerator():
    config = MemitConfig()
    assert config.value_batch_size("cpu") == CPU_VALUE_BATCH
    assert config.value_batch_size(torch.device("cuda", 1)) == ACCELERATOR_VALUE_BATCH
    assert CPU_VALUE_BATCH < ACCELERATOR_VALUE_BATCH
    assert MemitConfig(v_batch_size=7).value_batch_size("cpu") == 7
    assert MemitConfig(v_batch_size=7).value_batch_size("cuda") == 7


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="v_batch_size must be at least 1"):
        MemitConfig(v_batch_size=0)


def test_target_values_do_not_depend_on_the_batch_size():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    config = MemitConfig(
        layers=[1, 2], stats_corpus="identity", v_num_steps=6, context_template_lengths=[3],
        context_templates_per_length=2,
    )  # fmt: skip
    layout = config.layout(model)
    config.choose_target_modules(model)
    templates = context_templates(model, tokenizer, config)
    _, hidden = RequestRows(tokenizer, REQUESTS, templates).read(model, layout, 1, 2)
    norms = hidden.norm(dim=1)

    def deltas(per_batch: int) -> torch.Tensor:
        config.v_batch_size = per_batch
        return compute_deltas(model, tokenizer, REQUESTS, layout, 2, templates, config, norms)

    one_at_a_time, all_together = deltas(1), deltas(3)
    assert one_at_a_time.abs().max() > 0  # the optimisation moved
    torch.testing.assert_close(one_at_a_time, all_together, rtol=1e-4, atol=1e-5)
