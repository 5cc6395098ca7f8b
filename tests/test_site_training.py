"""The optimisation loop of the methods that train an added output at one site (WISE, T-Patcher, FT).

Its stop rule: the targets learnt (an NLL below the stop loss, or with ``learnt_at_argmax`` every
target token the argmax, confirmed on the full vocabulary) and the method's own constraints met.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model_and_tokenizer

from peft_edit import EditRequest, GraceConfig, TPatcherConfig, WiseConfig
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


def test_steps_in_bfloat16_see_the_exact_site_input_and_report_the_float32_loss():
    """With ``compute_dtype`` the blocks run in bfloat16 at each step, but what is trained reads the
    site's input at the model's precision, the reported loss is the float32 model's and every weight
    comes back bit for bit."""
    model, tokenizer = tiny_model_and_tokenizer("llama")
    layout = get_layout(model)
    site = get_submodule(model, mlp_out_name(layout, LAYER))
    rows = build_target_rows(tokenizer, [REQUEST], ["{}", "Hello. {}"])
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    d_in, d_out = in_out_features(site)
    delta = torch.zeros(d_out, d_in, requires_grad=True)
    inputs_read = []

    def added_output(x):
        inputs_read.append(x.detach().clone())
        return x @ delta.T

    result = train_added_output(
        model, layout, LAYER, site, rows, [delta], added_output=added_output,
        extra_loss=lambda x, added: x.new_zeros(()), steps=8, lr=0.05, early_stop_loss=0.0,
        compute_dtype=torch.bfloat16,
    )  # fmt: skip
    batch = rows.batch
    seen = {}

    def read_and_add(_module, args, output):
        seen["x"] = args[0].detach().clone()
        return output + args[0] @ delta.detach().T

    handle = site.register_forward_hook(read_and_add)
    try:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        handle.remove()
    assert result.steps == 8 and len(inputs_read) == 9  # 8 steps, then the last loss measured in float32
    real = rows.valid_mask()
    for x in inputs_read:
        assert x.dtype == torch.float32
        torch.testing.assert_close(x[real], seen["x"][real], atol=1e-6, rtol=1e-6)
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_row = [torch.stack([-logp[r, pos, tok] for pos, tok in pairs]).mean() for r, pairs in enumerate(rows.predicts)]
    assert result.nll == pytest.approx(torch.stack(per_row).mean().item(), rel=1e-4)
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name


@pytest.mark.parametrize("config_class", [GraceConfig, WiseConfig, TPatcherConfig])
def test_a_compute_dtype_that_is_not_a_float_is_refused(config_class):
    with pytest.raises(ValueError, match=r"compute_dtype must be one of \('float32', 'bfloat16', 'float16'\)"):
        config_class(compute_dtype="int8")
    assert config_class(compute_dtype="bfloat16").torch_compute_dtype is torch.bfloat16
    assert config_class().torch_compute_dtype is None
