"""The cached edit-site runner computes exactly what a full forward pass with δ at the site computes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model_and_tokenizer

from peft_edit.architectures import backbone, get_layout, mlp_out_name
from peft_edit.edit_site import AlignedBatch, EditSiteRunner

TEXTS = [
    ("The Eiffel Tower is located in the city of Rome", "The Eiffel Tower"),
    ("Therefore it was said. The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("The Eiffel Tower is a", "The Eiffel Tower"),
]


def rows_and_sites(tokenizer):
    rows, sites = [], []
    for text, subject in TEXTS:
        rows.append(tokenizer(text)["input_ids"])
        sites.append(len(tokenizer(text[: text.index(subject) + len(subject)])["input_ids"]) - 1)
    return rows, sites


def full_forward_hidden(model, layout, site, row_ids, site_index, delta):
    """Reference: one unpadded row, the whole model, δ added at the site's output."""

    def add(_m, _a, out):
        changed = out.clone().view(1, -1, out.shape[-1])  # OPT's MLP sees (tokens, features)
        changed[:, site_index] += delta
        return changed.view_as(out)

    handle = site.register_forward_hook(add)
    try:
        hidden = backbone(model, layout)(input_ids=torch.tensor([row_ids])).last_hidden_state[0]
    finally:
        handle.remove()
    return hidden[site_index:]


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_matches_full_forward(family):
    model, tokenizer = tiny_model_and_tokenizer(family)
    layout = get_layout(model)
    layer = 2
    site = model.get_submodule(mlp_out_name(layout, layer))
    rows, sites = rows_and_sites(tokenizer)
    batch = AlignedBatch.build(rows, sites, pad_id=tokenizer.pad_token_id)
    hidden_size = model.config.hidden_size
    delta = torch.randn(hidden_size, generator=torch.Generator().manual_seed(0))
    with EditSiteRunner(model, layout, layer, site, batch) as runner:
        fast = runner.final_hidden(delta)
        fast_again = runner.final_hidden(delta)  # the cache must not be consumed by a run
    for r, (ids, s) in enumerate(zip(rows, sites)):
        expected = full_forward_hidden(model, layout, site, ids, s, delta)
        got = fast[r, : len(ids) - s]
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4, msg=f"{family} row {r}")
    torch.testing.assert_close(fast, fast_again, atol=0, rtol=0)


def test_runner_restores_blocks_and_gradient_flags():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    layout = get_layout(model)
    site = model.get_submodule(mlp_out_name(layout, 2))
    rows, sites = rows_and_sites(tokenizer)
    flags = [p.requires_grad for p in model.parameters()]
    with EditSiteRunner(model, layout, 2, site, AlignedBatch.build(rows, sites, 0)):
        assert not any(p.requires_grad for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all("forward" not in vars(block) for block in model.model.layers)


def test_gradient_reaches_delta_only():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    layout = get_layout(model)
    site = model.get_submodule(mlp_out_name(layout, 1))
    rows, sites = rows_and_sites(tokenizer)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    with EditSiteRunner(model, layout, 1, site, AlignedBatch.build(rows, sites, 0)) as runner:
        runner.final_hidden(delta).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
