"""MEMIT's target values are optimised a few requests at a time: the default batch follows the device,
requests of similar length go together, and neither the batch size nor the grouping changes the
result."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model_and_tokenizer

from peft_edit import EditRequest, MemitConfig
from peft_edit.tuners.locate.values import build_rows
from peft_edit.tuners.memit.algorithm import RequestRows, compute_deltas, similar_width_chunks
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

    one_at_a_time, in_pairs, all_together = deltas(1), deltas(2), deltas(3)
    assert one_at_a_time.abs().max() > 0  # the optimisation moved
    # In pairs, the third request (the shortest suffix) is optimised first: each δ must still come
    # back in its request's place.
    widths = build_rows(tokenizer, REQUESTS, templates, config.kl_prompts).suffix_widths()
    assert similar_width_chunks(widths, 2)[0][0] == 2
    assert not torch.allclose(one_at_a_time[0], one_at_a_time[2])
    torch.testing.assert_close(one_at_a_time, in_pairs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one_at_a_time, all_together, rtol=1e-4, atol=1e-5)


def test_chunks_group_requests_of_similar_width_narrowest_first():
    assert similar_width_chunks([5, 1, 3, 1, 4], 2) == [[1, 3], [2, 4], [0]]
    assert similar_width_chunks([2, 2, 2], 5) == [[0, 1, 2]]
    assert similar_width_chunks([], 4) == []


def test_suffix_width_counts_from_the_subject_to_the_end_of_the_longest_row():
    _, tokenizer = tiny_model_and_tokenizer("llama")
    rows = build_rows(tokenizer, REQUESTS, ["{}", "A b c. {}"], ["{} is a"])
    for request, width in enumerate(rows.suffix_widths()):
        own = [r for r, owner in enumerate(rows.request_of_row) if owner == request]
        assert width == max(len(rows.ids[r]) - rows.sites[r] for r in own)
    eiffel, darrieux = rows.suffix_widths()[0], rows.suffix_widths()[2]
    assert eiffel > darrieux  # "… is located in the city of Rome" against "… is English"
