"""MEMIT's target values are optimised a few requests at a time: the default batch follows the device,
requests of similar length go together, and neither the batch size nor the grouping changes the
result."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_model_and_tokenizer

from peft_edit import EditRequest, MemitConfig
from peft_edit.architectures import mlp_out_name
from peft_edit.edit_site import EditSiteRunner
from peft_edit.requests import pad_token_id
from peft_edit.tuners.locate.values import ValueProblem, build_rows, optimise_deltas
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


def test_a_request_reached_early_stops_being_computed_and_the_rest_are_unchanged(monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    config = MemitConfig(layers=[1, 2], stats_corpus="identity", v_num_steps=6, context_template_lengths=[3])
    layout = config.layout(model)
    config.choose_target_modules(model)
    model.eval()
    templates = context_templates(model, tokenizer, config)
    site = model.get_submodule(mlp_out_name(layout, 2))

    def optimise(hp, can_drop: bool):
        monkeypatch.setattr(EditSiteRunner, "can_drop_rows", property(lambda self: can_drop))
        problem = ValueProblem(tokenizer, REQUESTS, templates, hp.kl_prompts, pad_token_id(tokenizer), "cpu")
        computed_rows = []
        with EditSiteRunner(model, layout, 2, site, problem.batch) as runner:
            final_hidden = runner.final_hidden
            runner.final_hidden = lambda d: computed_rows.append(len(d)) or final_hidden(d)
            return optimise_deltas(runner, problem, hp), computed_rows

    # The NLLs before any step: a stop loss between the lowest and the next makes one request
    # reach it at the first step, and the others go on.
    start, _ = optimise(dataclasses.replace(config, v_num_steps=1), can_drop=True)
    first, second = start.target_nll.sort().values[:2].tolist()
    assert first < second
    hp = dataclasses.replace(config, early_stop_loss=(first + second) / 2)
    dropping, rows_dropping = optimise(hp, can_drop=True)
    keeping, rows_keeping = optimise(hp, can_drop=False)
    rows_per_request = len(templates) + len(config.kl_prompts)
    assert rows_dropping[0] == rows_keeping[0] == rows_per_request * len(REQUESTS)
    assert rows_dropping[1] == rows_per_request * (len(REQUESTS) - 1)
    assert set(rows_keeping) == {rows_per_request * len(REQUESTS)}
    torch.testing.assert_close(dropping.delta, keeping.delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dropping.target_nll, keeping.target_nll, rtol=1e-4, atol=1e-5)
