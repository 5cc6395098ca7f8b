"""T-Patcher's own rules, on toy tensors and a tiny model (the shared adapter mechanics are in test_wise.py).

A patch starts separating the edit's keys from the memory's; a patch adds nothing where it does
not fire (bit-identical outputs there); patches stack one per edit and reload at their count.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_model_and_tokenizer

from peft_edit import EditRequest, TPatcherConfig, get_edited_model
from peft_edit.requests import tokenize_continuation
from peft_edit.tuners.tpatcher.algorithm import (
    activation_loss,
    as_plain_neurons,
    initial_patch,
    key_direction,
    memory_loss,
    patch_activation,
)
from peft_edit.tuners.tpatcher.layer import TPatcherLayer

REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject=s, target_new=t)
    for s, t in [("The Eiffel Tower", "Rome"), ("Big Ben", "Paris"), ("The Colosseum", "London")]
]


def edited_layer(edited):
    """The one wrapper layer the adapter put in the model."""
    (name,) = edited.peft_config["default"].target_modules
    return edited.base_model._layer(name)


def _whitened(edit, memory, ridge=0.01):
    return key_direction(edit, memory, memory.T @ memory / len(memory), ridge)


def test_key_direction_prefers_what_ordinary_keys_do_not_vary_along():
    torch.manual_seed(0)
    # Ordinary keys vary a lot along dim 0 and hardly along dim 1; the edit differs from their mean
    # by 3 along dim 0 (within their spread) and by 0.5 along dim 1 (far outside it).
    memory = torch.randn(500, 4) * torch.tensor([5.0, 0.05, 1.0, 1.0])
    edit = torch.tensor([[3.0, 0.5, 0.0, 0.0]])
    plain = key_direction(edit, memory, torch.eye(4), ridge=1e-6)
    whitened = _whitened(edit, memory)
    assert plain[0].abs() > plain[1].abs()  # the plain difference of means follows dim 0
    assert whitened[1].abs() > 0.9  # whitening turns it to dim 1
    margin = lambda d: (edit @ d).item() - (memory @ d).max().item()  # noqa: E731
    assert margin(whitened) > 0 > margin(plain)  # and only the whitened one separates the edit


def test_initial_patch_puts_the_edit_at_plus_one_and_the_memory_at_minus_one():
    torch.manual_seed(0)
    memory = torch.randn(200, 16)
    edit = torch.randn(3, 16) * 0.1 + torch.full((16,), 2.0)
    start = initial_patch(edit, memory, _whitened(edit, memory))
    pre = lambda keys: start.scale * keys @ start.direction + start.bias  # noqa: E731
    assert pre(edit).min().item() == pytest.approx(1.0, abs=1e-4)
    assert pre(memory).max().item() == pytest.approx(-1.0, abs=1e-4)
    assert activation_loss(pre(edit)).item() == pytest.approx(0.0, abs=1e-4)
    assert memory_loss(pre(memory)).item() == pytest.approx(0.0, abs=1e-4)


def test_initial_patch_still_points_the_right_way_when_not_separable():
    torch.manual_seed(0)
    memory = torch.randn(200, 16)
    edit = torch.cat([memory[:1], torch.randn(2, 16) + 3.0])  # one edit key is a memory key
    start = initial_patch(edit, memory, _whitened(edit, memory))
    pre = lambda keys: start.scale * keys @ start.direction + start.bias  # noqa: E731
    assert pre(edit).mean() > pre(memory).mean()
    assert activation_loss(pre(edit)) > 0 or memory_loss(pre(memory)) > 0  # left to training


def test_a_patch_is_silent_below_its_firing_threshold_and_stored_as_a_plain_neuron():
    torch.manual_seed(0)
    keys, bias, queries = torch.randn(3, 8), torch.randn(3), torch.randn(50, 8)
    pre = queries @ keys.T + bias
    shifted = patch_activation(pre, 0.5)
    assert torch.all(shifted[pre <= 0.5] == 0) and torch.all(shifted[pre > 0.5] > 0)
    # At the edit's margin (s = 1) a patch gives what the paper's ReLU gives there.
    assert torch.allclose(patch_activation(torch.tensor([1.0]), 0.5), torch.tensor([1.0]))
    assert torch.equal(patch_activation(pre, 0.0), torch.relu(pre))  # the paper's ReLU
    plain_keys, plain_bias = as_plain_neurons(keys, bias, 0.5)
    assert torch.allclose(torch.relu(queries @ plain_keys.T + plain_bias), shifted, atol=1e-6)


@torch.no_grad()
def test_a_patch_changes_only_the_tokens_where_it_fires():
    layer = TPatcherLayer(torch.nn.Linear(4, 3), "default", 0)
    key = torch.tensor([1.0, 0.0, 0.0, 0.0])
    layer.append("default", key, torch.tensor(-0.5), torch.tensor([1.0, 2.0, 3.0]))
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.2, 5.0, 5.0, 5.0]]])
    out, base = layer(x), layer.base_layer(x)
    torch.testing.assert_close(out[0, 0], base[0, 0] + 0.5 * torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(out[0, 1], base[0, 1])  # silent: bit for bit
    with pytest.raises(ValueError, match="do not fit"):
        layer.append("default", torch.zeros(5), torch.tensor(0.0), torch.zeros(3))
    with pytest.raises(ValueError, match="do not fit"):  # two keys, one value
        layer.append("default", torch.zeros(2, 4), torch.zeros(2), torch.zeros(1, 3))
    # An edit's patches arrive together and occupy consecutive slots.
    assert layer.append("default", torch.zeros(2, 4), torch.full((2,), -1.0), torch.ones(2, 3)) == (1, 3)
    assert layer.size("default") == 3


def test_one_patch_per_target_token_and_the_ledger_gives_each_edit_its_neurons(tmp_path):
    from peft import PeftModel

    model, tokenizer = tiny_model_and_tokenizer("llama")
    config = TPatcherConfig(num_steps=5, context_templates_per_length=0, stats_corpus="identity")
    edited = get_edited_model(model, config, REQUESTS[:1], tokenizer=tokenizer, progress=False)
    edited.edit(REQUESTS[1:], progress=False)
    (name,) = edited.peft_config["default"].target_modules
    tokens = [len(tokenize_continuation(tokenizer, r.filled_prompt, r.target_new)[1]) for r in REQUESTS]
    ends = [sum(tokens[: i + 1]) for i in range(len(tokens))]
    assert [e["modules"][name] for e in edited.ledger] == [[end - n, end] for end, n in zip(ends, tokens)]
    layer = edited_layer(edited)
    assert layer.tp_keys["default"].shape[0] == ends[-1]
    assert torch.isfinite(layer.tp_values["default"]).all()
    edited.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    loaded = edited_layer(reloaded)
    assert torch.equal(loaded.tp_keys["default"], layer.tp_keys["default"])


def test_per_token_masks_mark_one_position_per_row_and_cover_the_predicting_mask():
    from peft_edit.tuners.site_training import build_target_rows

    _, tokenizer = tiny_model_and_tokenizer("llama")
    rows = build_target_rows(tokenizer, REQUESTS[:1], ["{}", "Hello. {}"])
    masks = rows.predicting_mask_per_token()
    n_tokens = len(tokenize_continuation(tokenizer, REQUESTS[0].filled_prompt, REQUESTS[0].target_new)[1])
    assert masks.shape[0] == n_tokens
    assert (masks.sum(-1) == 1).all()  # each token predicted once in every row
    assert torch.equal(masks.any(0), rows.predicting_mask())
    with pytest.raises(ValueError, match="single request"):
        build_target_rows(tokenizer, REQUESTS[:2], ["{}"]).predicting_mask_per_token()
