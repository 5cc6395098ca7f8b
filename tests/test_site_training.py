"""The optimisation loop of the methods that train an added output at one site (WISE, T-Patcher, FT).

Its stop rule: the targets learnt (an NLL below the stop loss, or with ``learnt_at_argmax`` every
target token the argmax, confirmed on the full vocabulary) and the method's own constraints met.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model_and_tokenizer

from peft_edit import EditRequest
from peft_edit.architectures import get_layout, get_submodule, in_out_features, mlp_out_name
from peft_edit.tuners.site_training import build_target_rows, train_added_output

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
LAYER = 2


def _train(learnt_at_argmax: bool, done=lambda: True, steps: int = 60):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    layout = get_layout(model)
    site = get_submodule(model, mlp_out_name(layout, LAYER))
    rows = build_target_rows(tokenizer, [REQUEST], ["{}", "Hello. {}"])
    d_in, d_out = in_out_features(site)
    delta = torch.zeros(d_out, d_in, requires_grad=True)
    result = train_added_output(
        model, layout, LAYER, site, rows, [delta],
        added_output=lambda x: x @ delta.T,
        extra_loss=lambda x, added: x.new_zeros(()),
        steps=steps, lr=0.05, early_stop_loss=0.0, done=done, learnt_at_argmax=learnt_at_argmax,
    )  # fmt: skip
    return model, site, rows, delta.detach(), result


def _targets_are_the_argmax(model, site, rows, delta) -> bool:
    handle = site.register_forward_hook(lambda _m, args, out: out + args[0] @ delta.T)
    try:
        with torch.no_grad():
            logits = model(input_ids=rows.batch.input_ids, attention_mask=rows.batch.attention_mask).logits
    finally:
        handle.remove()
    return all(logits[r, pos].argmax().item() == tok for r, pairs in enumerate(rows.predicts) for pos, tok in pairs)


def test_training_stops_once_every_target_token_is_the_argmax_when_asked():
    model, site, rows, delta, result = _train(learnt_at_argmax=True)
    assert 1 < result.steps < 60
    assert result.nll > 0.0  # stopped on the argmax, not on the (unreachable) stop loss
    assert _targets_are_the_argmax(model, site, rows, delta)
    # One update fewer and some target is not yet the argmax: the stop was the first possible one.
    *_, earlier_delta, _ = _train(learnt_at_argmax=True, steps=result.steps - 1)
    assert not _targets_are_the_argmax(model, site, rows, earlier_delta)


@pytest.mark.parametrize("learnt_at_argmax, done", [(False, lambda: True), (True, lambda: False)])
def test_training_runs_every_step_without_the_argmax_rule_or_while_constraints_fail(learnt_at_argmax, done):
    *_, result = _train(learnt_at_argmax=learnt_at_argmax, done=done, steps=30)
    assert result.steps == 30
