"""The cached edit-site runner computes exactly what a full forward pass with δ at the site computes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model_and_tokenizer
from torch import nn

from peft_edit.architectures import (
    backbone,
    get_blocks,
    get_layout,
    lm_head,
    logits_from_hidden,
    mlp_out_name,
)
from peft_edit.edit_site import AlignedBatch, EditSiteRunner, TargetLogProbs
from peft_edit.tuners.site_training import token_site_inputs

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


def texts_at_layer_2(family):
    """A tiny model of ``family``, its block-2 MLP output projection as the site, and TEXTS aligned there."""
    model, tokenizer = tiny_model_and_tokenizer(family)
    layout = get_layout(model)
    site = model.get_submodule(mlp_out_name(layout, 2))
    rows, sites = rows_and_sites(tokenizer)
    return model, layout, 2, site, rows, sites, AlignedBatch.build(rows, sites, pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_matches_full_forward(family):
    model, layout, layer, site, rows, sites, batch = texts_at_layer_2(family)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_without_a_prefix_matches_full_forward(family):
    """Sites at the first column: no cache, the setting-up pass ends with the site's block (parts of it
    called again after the site, like Phi's dropout, must keep running at every step)."""
    model, layout, layer, site, rows, _, _ = texts_at_layer_2(family)
    delta = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    batch = AlignedBatch.build(rows, [0] * len(rows), pad_id=0)
    with EditSiteRunner(model, layout, layer, site, batch) as runner:
        assert runner.prefix_cache is None
        fast = runner.final_hidden(delta)
    for r, ids in enumerate(rows):
        expected = full_forward_hidden(model, layout, site, ids, 0, delta)
        got = fast[r, : len(ids)]
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4, msg=f"{family} row {r}")


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_dropped_mid_optimisation_leave_the_others_exact(family):
    model, layout, layer, site, rows, sites, batch = texts_at_layer_2(family)
    deltas = torch.randn(len(rows), model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with EditSiteRunner(model, layout, layer, site, batch) as runner:
        assert runner.can_drop_rows
        site_output = runner.site_output.clone()
        runner.final_hidden(deltas)
        runner.keep_rows([0, 2])
        assert runner.batch.input_ids.shape[0] == 2
        torch.testing.assert_close(runner.site_output, site_output[[0, 2]])
        kept = runner.final_hidden(deltas[[0, 2]])
        runner.keep_rows([1])  # renumbered: row 1 of the two is the original row 2
        last = runner.final_hidden(deltas[[2]])
    for got, r in [(kept[0], 0), (kept[1], 2), (last[0], 2)]:
        ids, s = rows[r], sites[r]
        expected = full_forward_hidden(model, layout, site, ids, s, deltas[r])
        torch.testing.assert_close(
            got[: len(ids) - s], expected, atol=2e-4, rtol=2e-4, msg=f"{family} row {r}"
        )


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
    assert "forward" not in vars(site)


def test_setting_up_is_one_pass_and_steps_skip_what_runs_before_the_site(monkeypatch):
    """Setting up runs the whole rows once (the cache then cut to the prefix); a step recomputes the
    blocks above the site over the suffix, and nothing of the site's block that runs before it: not
    its attention, nor the input projections of the MLP whose output projection is the site."""
    model, layout, layer, site, rows, sites, batch = texts_at_layer_2("llama")
    blocks = get_blocks(model, layout)
    widths = {"top": [], "site's attention": [], "site's MLP input": []}
    handles = [  # a replayed module's hooks still run, so the attention's own projection is watched
        module.register_forward_pre_hook(lambda _m, args, key=key: widths[key].append(args[0].shape[1]))
        for key, module in (("top", blocks[-1]), ("site's attention", blocks[layer].self_attn.q_proj))
    ]
    gate, linear_forward = blocks[layer].mlp.gate_proj, torch.nn.Linear.forward

    def watched_linear(self, x):  # the class's forward, which a replayed module no longer reaches
        if self is gate:
            widths["site's MLP input"].append(x.shape[1])
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", watched_linear)
    width, suffix = batch.input_ids.shape[1], batch.input_ids.shape[1] - batch.split
    try:
        with EditSiteRunner(model, layout, layer, site, batch) as runner:
            assert widths == {"top": [width], "site's attention": [width], "site's MLP input": [width]}
            assert runner.prefix_cache.get_seq_length() == batch.split
            runner.final_hidden(torch.zeros(model.config.hidden_size))
    finally:
        for handle in handles:
            handle.remove()
    assert widths == {"top": [width, suffix], "site's attention": [width], "site's MLP input": [width]}


def test_steps_replay_the_site_and_its_own_forward_comes_back():
    """The site's input does not depend on δ, so its output (other edits included) is computed once."""
    model, tokenizer = tiny_model_and_tokenizer("llama")
    layout = get_layout(model)
    site = model.get_submodule(mlp_out_name(layout, 2))
    rows, sites = rows_and_sites(tokenizer)
    calls = []

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return type(site).forward(site, *args, **kwargs)

    site.forward = counting_forward  # an instance-level forward, as dispatch hooks install
    delta = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with EditSiteRunner(model, layout, 2, site, AlignedBatch.build(rows, sites, 0)) as runner:
        before_steps = len(calls)
        first = runner.final_hidden(delta)
        second = runner.final_hidden(delta)
    assert before_steps > 0 and len(calls) == before_steps
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert vars(site)["forward"] is counting_forward


@pytest.mark.parametrize("family", FAMILIES)
def test_site_output_is_what_the_site_emits(family):
    """Recorded before the block uses it: Falcon adds attention to the MLP's output in place."""
    model, tokenizer = tiny_model_and_tokenizer(family)
    layout = get_layout(model)
    site = model.get_submodule(mlp_out_name(layout, 2))
    rows, sites = rows_and_sites(tokenizer)
    emitted = []
    handle = site.register_forward_hook(lambda _m, _a, out: emitted.append(out.detach().clone()))
    try:
        with torch.no_grad():
            backbone(model, layout)(input_ids=torch.tensor([rows[0]]))
    finally:
        handle.remove()
    expected = emitted[0].reshape(len(rows[0]), -1)[sites[0]]
    with EditSiteRunner(
        model, layout, 2, site, AlignedBatch.build(rows, sites, tokenizer.pad_token_id)
    ) as runner:
        got = runner.site_output[0]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_site_inputs_are_the_sites_input_at_every_token_of_each_row(family):
    """Gathered from the prefix run and the recording run, padding left out, in each row's token order."""
    model, layout, layer, site, rows, sites, batch = texts_at_layer_2(family)
    with EditSiteRunner(model, layout, layer, site, batch, keep_token_inputs=True) as runner:
        got = runner.token_site_inputs
    expected = token_site_inputs(model, site, rows, pad_id=0)
    assert (
        [g.shape for g in got]
        == [e.shape for e in expected]
        == [(len(r), e.shape[-1]) for r, e in zip(rows, expected)]
    )
    for r, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5, msg=f"{family} row {r}")


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


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bfloat16_runner_approximates_each_step_and_switches_back_to_exact(family):
    """Steps in bfloat16 come near the exact hidden states, full_precision() gives them exactly, gradients
    reach δ in float32, dropped rows stay aligned, and the model's weights come back bit for bit."""
    model, layout, layer, site, rows, sites, batch = texts_at_layer_2(family)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    delta = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)).requires_grad_(
        True
    )
    with EditSiteRunner(model, layout, layer, site, batch, compute_dtype=torch.bfloat16) as runner:
        assert runner.lowered
        approximate = runner.final_hidden(delta)
        approximate.pow(2).sum().backward()
        with torch.no_grad(), runner.full_precision():
            exact = runner.final_hidden(delta)
        runner.keep_rows([2])
        with torch.no_grad():
            kept = runner.final_hidden(delta)
    assert approximate.dtype == torch.float32 and delta.grad is not None and delta.grad.abs().sum() > 0
    for r, (ids, s) in enumerate(zip(rows, sites)):
        expected = full_forward_hidden(model, layout, site, ids, s, delta.detach())
        n = len(ids) - s
        torch.testing.assert_close(exact[r, :n], expected, atol=2e-4, rtol=2e-4, msg=f"{family} row {r}")
        error = (approximate[r, :n].detach() - expected).norm() / expected.norm()
        assert 0 < error < 0.05, f"{family} row {r}: relative error {error:.4f}"
    error = (kept[0, : len(rows[2]) - sites[2]] - exact[2, : len(rows[2]) - sites[2]]).norm() / exact[
        2
    ].norm()
    assert error < 0.05
    for name, p in model.named_parameters():
        assert p.dtype == weights[name].dtype and torch.equal(p, weights[name]), name
    assert not any(block._forward_pre_hooks for block in get_blocks(model, layout))


# ------------------------------------------------------------------------- shortlisted softmax
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_over_a_vocabulary_are_those_columns_of_the_full_logits(family):
    model, _ = tiny_model_and_tokenizer(family)
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    vocabulary = torch.tensor([0, 5, 17, model.config.vocab_size - 1])
    full = logits_from_hidden(model, hidden)
    torch.testing.assert_close(logits_from_hidden(model, hidden, vocabulary), full[:, vocabulary])


def _target_log_probs(per_position, refresh_every=3):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    hidden = torch.randn(2, 4, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    rows, columns, tokens = [0, 0, 1], [1, 3, 2], torch.tensor([7, 11, 3])
    exact = torch.log_softmax(logits_from_hidden(model, hidden[rows, columns]), -1)[torch.arange(3), tokens]
    return model, hidden, TargetLogProbs(model, rows, columns, tokens, per_position, refresh_every), exact


def test_target_log_probs_refresh_on_the_full_vocabulary_and_bound_from_above_between():
    model, hidden, targets, exact = _target_log_probs(per_position=4)
    first = targets(hidden)
    assert targets.exact
    torch.testing.assert_close(first, exact)
    # The shortlist: the targets and each position's 4 most likely tokens, far from the whole vocabulary.
    assert set(targets.shortlist.tolist()) >= {7, 11, 3} and len(targets.shortlist) <= 3 * 4 + 3
    between = targets(hidden)
    assert not targets.exact
    assert (between >= exact - 1e-6).all() and (between > exact + 1e-4).any()
    targets(hidden)
    assert not targets.exact
    targets(hidden)
    assert targets.exact  # every refresh_every-th call (3 here) refreshes
    targets(hidden)
    assert not targets.exact
    targets.shortlist = None
    torch.testing.assert_close(targets.full(hidden), exact)
    assert set(targets.shortlist.tolist()) >= {7, 11, 3}  # a full check takes the shortlist afresh
    targets(hidden)
    assert not targets.exact  # and the count to the next refresh starts again
    targets(hidden)
    assert not targets.exact
    targets(hidden)
    assert targets.exact


def test_target_log_probs_with_every_token_shortlisted_are_exact():
    model, hidden, targets, exact = _target_log_probs(per_position=10**6)
    targets(hidden)
    assert len(targets.shortlist) == model.config.vocab_size
    torch.testing.assert_close(targets(hidden), exact, atol=1e-5, rtol=1e-5)


def test_target_log_probs_pass_gradients_through_the_shortlist():
    model, hidden, targets, _ = _target_log_probs(per_position=4)
    hidden = hidden.clone().requires_grad_(True)
    targets(hidden)
    targets(hidden).sum().backward()
    assert hidden.grad[0, 1].abs().sum() > 0 and hidden.grad[0, 0].abs().sum() == 0


def test_a_refresh_call_measures_on_the_full_vocabulary_and_passes_the_shortlists_gradient():
    model, hidden, targets, exact = _target_log_probs(per_position=4)
    hidden = hidden.clone().requires_grad_(True)
    refreshed = targets(hidden)
    torch.testing.assert_close(refreshed.detach(), exact)
    (grad,) = torch.autograd.grad(refreshed.sum(), hidden)
    picked = hidden[targets.rows, targets.columns]
    shortlisted = torch.log_softmax(logits_from_hidden(model, picked, targets.shortlist), dim=-1)
    wanted = shortlisted.gather(1, torch.searchsorted(targets.shortlist, targets.tokens)[:, None]).sum()
    (expected,) = torch.autograd.grad(wanted, hidden)
    torch.testing.assert_close(grad, expected)


def test_refreshes_in_a_lower_dtype_are_approximate_and_a_full_check_stays_exact():
    model, hidden, _, exact = _target_log_probs(per_position=4)
    targets = TargetLogProbs(
        model, [0, 0, 1], [1, 3, 2], torch.tensor([7, 11, 3]), 4, 3, refresh_dtype=torch.bfloat16
    )
    head = lm_head(model).weight
    approximate = targets(hidden)
    assert not targets.exact and targets._refresh_weight.dtype == torch.bfloat16
    in_bfloat16 = torch.log_softmax(
        nn.functional.linear(hidden[[0, 0, 1], [1, 3, 2]].bfloat16(), head.bfloat16()).float(), -1
    )[torch.arange(3), targets.tokens]
    torch.testing.assert_close(approximate, in_bfloat16)  # the values are bfloat16's ...
    assert not torch.equal(approximate, exact)
    assert set(targets.shortlist.tolist()) >= {7, 11, 3}  # ... and the shortlist is taken from them
    torch.testing.assert_close(targets.full(hidden), exact)  # a check runs at the model's own precision
    assert head.dtype == torch.float32


def test_target_log_probs_record_whether_every_target_is_the_argmax():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    hidden = torch.randn(2, 4, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    rows, columns = [0, 0, 1], [1, 3, 2]
    best = logits_from_hidden(model, hidden[rows, columns]).argmax(-1)
    runner_up = logits_from_hidden(model, hidden[rows, columns]).topk(2, dim=-1).indices[:, 1]
    on_top = TargetLogProbs(model, rows, columns, best, per_position=4, refresh_every=3)
    for _ in range(3):  # the refresh call, then two shortlisted ones
        on_top(hidden)
        assert on_top.on_top
    one_below = TargetLogProbs(model, rows, columns, torch.cat([best[:2], runner_up[2:]]), per_position=4)
    for _ in range(2):
        one_below(hidden)
        assert not one_below.on_top
    one_below.full(hidden)
    assert not one_below.on_top
    on_top.full(hidden)
    assert on_top.on_top


def test_target_log_probs_record_each_targets_lead_over_the_best_other_token():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    hidden = torch.randn(2, 4, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    rows, columns = [0, 1], [1, 2]
    logp = torch.log_softmax(logits_from_hidden(model, hidden[rows, columns]).float(), dim=-1)
    top2 = logp.topk(2, dim=-1)
    tokens = torch.stack([top2.indices[0, 0], top2.indices[1, 1]])  # the best, then the runner-up
    expected = torch.stack([top2.values[0, 0] - top2.values[0, 1], top2.values[1, 1] - top2.values[1, 0]])
    targets = TargetLogProbs(model, rows, columns, tokens, per_position=4)
    targets.full(hidden)
    torch.testing.assert_close(targets.leads, expected)
    assert targets.leads[0] > 0 > targets.leads[1]
    targets(hidden)  # a shortlist call: the normaliser and the rivals are those of the shortlist
    assert (targets.leads >= expected - 1e-5).all()


def test_a_suffix_run_extends_a_copy_of_the_prefix_cache_and_leaves_the_prefix_as_it_was():
    from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer

    from peft_edit.edit_site import _extendable_copy

    prefix = DynamicCache()
    prefix.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), layer_idx=0)
    prefix.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), layer_idx=1)
    stored = [(layer.keys, layer.values) for layer in prefix.layers]

    extended = _extendable_copy(prefix)
    assert extended.layers[0].keys is stored[0][0]  # shared, not copied
    extended.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), layer_idx=0)
    assert extended.get_seq_length(0) == 8 and prefix.get_seq_length(0) == 3
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(prefix.layers, stored))
    assert torch.equal(prefix.layers[0].keys, torch.ones(1, 2, 3, 4))

    # A layer that writes into its stored tensors is never shared.
    prefix.layers.append(StaticLayer(max_cache_len=8))
    assert not isinstance(prefix.layers[-1], DynamicLayer)
    deep = _extendable_copy(prefix)
    assert deep.layers[0].keys is not stored[0][0] and torch.equal(deep.layers[0].keys, stored[0][0])
