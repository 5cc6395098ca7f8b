"""WISE and T-Patcher on tiny models: the mechanics every wrapped edit adapter must have, plus WISE's rules.

One matrix of (method x behaviour): the edit changes the edited prompt; save and a fresh load give
the same logits at 0, 1 and several edits; unload is bit-identical; disable_adapter gives the
original outputs; merging is refused with a clear error and changes nothing; a failed edit()
rolls back; KV-cached generation equals generation without a cache. Then WISE alone: the router
(per-token running mean, continued across cached calls, padding ignored), shard placement and
Ties merging. Tiny random models test mechanics, not knowledge (test_wise_tpatcher_smollm2.py
does that).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny_models import PAD_ID, tiny_model, tiny_model_and_tokenizer

from peft_edit import EditRequest, TPatcherConfig, WiseConfig, get_edited_model
from peft_edit.requests import join_prompt_and_target
from peft_edit.tuners.wise.algorithm import (
    margin_loss,
    memory_threshold,
    routes_apart,
    running_mean_gaps,
    segment_running_means,
    shared_prefix_lengths,
    texts_routed,
    ties_merge,
    token_gaps,
)
from peft_edit.tuners.wise.layer import RoutingContext, WiseLayer
from peft_edit.tuners.wise.storage import pack, unpack
from peft_edit.tuners.wrapped import CannotMergeError

TEMPLATE = "{} is located in the city of"
SUBJECTS = ["The Eiffel Tower", "Big Ben", "The Colosseum", "The Space Needle"]
TARGETS = ["Rome", "Paris", "London", "Seattle"]
REQUESTS = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS, TARGETS)]
PROBE = "The Eiffel Tower is located in the city of"

# Few steps, no sampled prefixes: the mechanics, fast.
FAST = dict(num_steps=8, context_templates_per_length=0)
CONFIGS = {
    "wise": lambda **kw: WiseConfig(**{**FAST, "edits_per_shard": 1, "shards_per_memory": 2, **kw}),
    "tpatcher": lambda **kw: TPatcherConfig(**{**FAST, "stats_corpus": "identity", **kw}),
}


def logits(model, tokenizer, text=PROBE):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0].float()


def greedy(model, tokenizer, text=PROBE, n=3, use_cache=True):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD_ID, use_cache=use_cache
        )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def edited_layer(edited):
    """The one wrapper layer the adapter put in the model."""
    (name,) = edited.peft_config["default"].target_modules
    return edited.base_model._layer(name)


def adapter_state(edited):
    layer = edited_layer(edited)
    return {name: getattr(layer, name)["default"].clone() for name in layer.adapter_layer_names}


@pytest.fixture(scope="module")
def llama():
    return tiny_model_and_tokenizer("llama")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def edited_twice(request, llama):
    """Each method with two edits on a tiny Llama (shared: tests below must not change it)."""
    _, tokenizer = llama
    model = tiny_model("llama")
    before = logits(model, tokenizer)
    edited = get_edited_model(
        model, CONFIGS[request.param](), REQUESTS[:1], tokenizer=tokenizer, progress=False
    )
    edited.edit(REQUESTS[1:2], progress=False)
    return request.param, edited, tokenizer, before


def test_edit_changes_the_edited_prompt_and_the_ledger_lists_it(edited_twice):
    method, edited, tokenizer, before = edited_twice
    assert (logits(edited, tokenizer)[-1] - before[-1]).abs().max() > 1e-3, method
    assert edited.peft_config["default"].requests() == REQUESTS[:2]


@pytest.mark.parametrize("held", [0, 1, 3])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_save_then_fresh_load_reproduces_logits(method, held, llama, tmp_path):
    _, tokenizer = llama
    edited = get_edited_model(
        tiny_model("llama"), CONFIGS[method](), REQUESTS[:held] or None, tokenizer=tokenizer, progress=False
    )
    edited.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert reloaded.peft_config["default"].edits == edited.peft_config["default"].edits
    for text in (PROBE, "Big Ben is located in the city of", "The weather is"):
        torch.testing.assert_close(logits(reloaded, tokenizer, text), logits(edited, tokenizer, text))
    state, loaded = adapter_state(edited), adapter_state(reloaded)
    assert all(torch.equal(state[k], loaded[k]) for k in state)


def test_disable_adapter_gives_the_original_outputs(edited_twice):
    _, edited, tokenizer, before = edited_twice
    with edited.disable_adapter():
        torch.testing.assert_close(logits(edited, tokenizer), before)


def test_merge_is_refused_with_a_clear_error_and_changes_nothing(edited_twice):
    method, edited, tokenizer, _ = edited_twice
    outputs = logits(edited, tokenizer)
    with pytest.raises(CannotMergeError, match="cannot be merged"):
        edited.merge_and_unload()
    with pytest.raises(CannotMergeError):
        edited.merge_adapter()
    torch.testing.assert_close(logits(edited, tokenizer), outputs)
    assert edited_layer(edited) is not None, method  # still wrapped


def test_cached_generation_equals_generation_without_cache(edited_twice):
    _, edited, tokenizer, _ = edited_twice
    for text in (PROBE, "Big Ben is located in the city of", "The weather is"):
        assert greedy(edited, tokenizer, text) == greedy(edited, tokenizer, text, use_cache=False), text


def test_batched_left_padded_rows_match_single_rows(edited_twice):
    _, edited, tokenizer, _ = edited_twice
    texts = [PROBE, "Big Ben is located in the city of", "The weather today is sunny"]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        batched = edited(**batch).logits[:, -1].float()
    for i, text in enumerate(texts):
        torch.testing.assert_close(batched[i], logits(edited, tokenizer, text)[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_failed_edit_rolls_back_to_the_edits_held_before(method, llama, monkeypatch):
    _, tokenizer = llama
    edited = get_edited_model(
        tiny_model("llama"), CONFIGS[method](), REQUESTS[:1], tokenizer=tokenizer, progress=False
    )
    state, ledger, outputs = adapter_state(edited), edited.ledger, logits(edited, tokenizer)
    tuner = edited.base_model
    compute = type(tuner).compute_edit
    calls = []

    def fail_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(type(tuner), "compute_edit", fail_on_second)
    with pytest.raises(RuntimeError, match="boom"):
        edited.edit(REQUESTS[1:3], progress=False)
    after = adapter_state(edited)
    assert edited.ledger == ledger
    assert all(torch.equal(state[k], after[k]) for k in state)
    torch.testing.assert_close(logits(edited, tokenizer), outputs)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_unload_gives_back_bit_identical_weights(method, llama):
    _, tokenizer = llama
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edited = get_edited_model(model, CONFIGS[method](), REQUESTS[:2], tokenizer=tokenizer, progress=False)
    base = edited.unload_edits()
    after = base.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The routing hook left with the adapter: the plain model runs as before.
    assert not any(h for m in base.modules() for h in m._forward_pre_hooks.values() if "routing" in repr(h))


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_other_families_edit_save_and_load(method, family, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer(family)
    edited = get_edited_model(model, CONFIGS[method](), REQUESTS[:2], tokenizer=tokenizer, progress=False)
    edited.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(tiny_model(family), tmp_path / "a")
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(edited, tokenizer))
    assert greedy(edited, tokenizer) == greedy(edited, tokenizer, use_cache=False)


# ----------------------------------------------------------------------------------- WISE alone
@pytest.mark.parametrize("shape", [(1, 3, 5), (2, 8, 8), (3, 7, 11)])
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
def test_packing_a_side_memory_gives_it_back_exactly(shape, density):
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < density)
    values, bits, stored_shape = pack(dense)
    assert values.numel() == int((dense != 0).sum()) and bits.dtype == torch.uint8
    assert torch.equal(unpack(values, bits, stored_shape), dense)
    if values.numel():
        with pytest.raises(ValueError, match="damaged"):
            unpack(values[1:], bits, stored_shape)


def test_a_saved_side_memory_holds_its_non_zero_entries_only_and_older_dense_files_load(llama, tmp_path):
    _, tokenizer = llama
    edited = get_edited_model(
        tiny_model("llama"), CONFIGS["wise"](shards_per_memory=1), REQUESTS[:2], tokenizer=tokenizer, progress=False
    )
    dense = adapter_state(edited)["wise_delta"]
    edited.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    (values_key,) = [k for k in saved if k.endswith(".wise_delta")]
    assert saved[values_key].numel() == int((dense != 0).sum()) < 0.3 * dense.numel()  # mask_ratio 0.2
    assert {k.rpartition(".")[2] for k in saved} == {"wise_delta", "wise_delta_support", "wise_delta_shape", "wise_threshold"}

    # A file written before packing (dense memories, no support) loads as it is.
    stem = values_key.removesuffix(".wise_delta")
    older = {k: v for k, v in saved.items() if not k.startswith(stem + ".wise_delta_")}
    older[values_key] = dense.clone()
    save_file(older, tmp_path / "a" / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    assert torch.equal(adapter_state(reloaded)["wise_delta"], dense)
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(edited, tokenizer))


def test_a_config_saved_before_the_optimizer_field_keeps_editing_with_sgd(llama, tmp_path):
    _, tokenizer = llama
    edited = get_edited_model(tiny_model("llama"), CONFIGS["wise"](), REQUESTS[:1], tokenizer=tokenizer, progress=False)
    edited.save_pretrained(tmp_path / "a")
    assert PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a").peft_config["default"].optimizer == "adam"

    config_file = tmp_path / "a" / "adapter_config.json"
    older = json.loads(config_file.read_text())
    del older["optimizer"], older["stop_rule"]
    older["lr"] = 1.0
    config_file.write_text(json.dumps(older))
    config = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a").peft_config["default"]
    assert (config.optimizer, config.lr, config.stop_rule) == ("sgd", 1.0, "margins")


def _training_steps(steps: list[int], llama, **config) -> int:
    """Steps WISE trains for one edit on a tiny llama with ``config``; ``steps`` is the fixture's list."""
    _, tokenizer = llama
    config = WiseConfig(num_steps=60, context_templates_per_length=0, **config)
    already = len(steps)
    get_edited_model(tiny_model("llama"), config, REQUESTS[:1], tokenizer=tokenizer, progress=False)
    (trained,) = steps[already:]  # one training run per edit
    return trained


def test_the_routing_stop_rule_ends_training_once_the_target_is_learnt_and_routed_apart(llama, wise_training_steps):
    steps = wise_training_steps
    assert _training_steps(steps, llama, stop_rule="margins") == 60  # the margins never all hold here
    assert _training_steps(steps, llama, stop_rule="routing") < 60
    # An unrelated text the router cannot leave alone (the edit's own prompt): no early stop.
    same = [REQUESTS[0].filled_prompt]
    assert _training_steps(steps, llama, stop_rule="routing", unrelated_texts=same) == 60


def test_wise_shards_merge_into_one_memory_and_the_ledger_sizes_it(llama, tmp_path):
    _, tokenizer = llama
    config = CONFIGS["wise"](edits_per_shard=1, shards_per_memory=2)
    edited = get_edited_model(tiny_model("llama"), config, REQUESTS[:1], tokenizer=tokenizer, progress=False)
    sizes = [adapter_state(edited)["wise_delta"].shape[0]]
    for request in REQUESTS[1:4]:
        edited.edit([request], progress=False)
        sizes.append(adapter_state(edited)["wise_delta"].shape[0])
    # shard, merged memory, memory + shard, two merged memories
    assert sizes == [1, 1, 2, 2]
    assert [e["modules"] for e in edited.ledger][-1] == {
        edited.peft_config["default"].target_modules[0]: [1, 2]
    }
    edited.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    assert adapter_state(reloaded)["wise_delta"].shape[0] == 2
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(edited, tokenizer))


def test_wise_thresholds_are_positive_and_the_edit_routes_to_its_memory(llama):
    _, tokenizer = llama
    edited = get_edited_model(
        tiny_model("llama"), CONFIGS["wise"](), REQUESTS[:1], tokenizer=tokenizer, progress=False
    )
    layer = edited_layer(edited)
    assert (layer.wise_threshold["default"] > 0).all()
    with torch.no_grad():
        x = torch.randn(1, 5, layer.wise_delta["default"].shape[2])
        base = layer.base_layer(x)
        layer.wise_threshold["default"].data.fill_(float("inf"))  # nothing can pass: the output is the base's
        torch.testing.assert_close(layer(x), base, atol=0, rtol=0)
        layer.wise_threshold["default"].data.fill_(1e-9)  # everything passes: base + D x
        expected = base + x @ layer.wise_delta["default"][0].T
        torch.testing.assert_close(layer(x), expected)


UNRELATED = [
    "The weather today is mild with a light breeze.",
    "She bought bread, cheese and apples at the market.",
    "How many legs does a spider have?",
    "The committee will meet again next Tuesday.",
    "Water boils at a lower temperature on a mountain.",
    "He plays the violin in a small orchestra.",
]


def _routed_by_the_model(edited, tokenizer, texts) -> int:
    """How many texts the adapter changes at all (only a routed token can change an output)."""
    count = 0
    for text in texts:
        with edited.disable_adapter():
            plain = logits(edited, tokenizer, text)
        count += not torch.equal(logits(edited, tokenizer, text), plain)
    return count


@pytest.mark.parametrize("act_ratio", [0.88, 1e-6])
def test_the_ledger_counts_the_unrelated_texts_the_edits_memory_takes(llama, act_ratio):
    """Each entry's ``unrelated_routed`` is what the router does with the texts the memory was trained to
    leave alone; with a threshold near zero it takes all of them, and the first such edit warns (once)."""
    _, tokenizer = llama
    config = CONFIGS["wise"](unrelated_texts=UNRELATED, act_ratio=act_ratio)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edited = get_edited_model(tiny_model("llama"), config, REQUESTS[:1], tokenizer=tokenizer, progress=False)
        first = edited.peft_config["default"].edits[0]["unrelated_routed"]
        assert first == [_routed_by_the_model(edited, tokenizer, UNRELATED), len(UNRELATED)]
        # The second edit fills the memory's second shard and merges both: the first edit's prompt,
        # one of its unrelated texts while it trained, is held by the merged memory, not counted.
        edited.edit(REQUESTS[1:2], progress=False)
    second = edited.peft_config["default"].edits[1]["unrelated_routed"]
    assert edited_layer(edited).size("default") == 1
    assert second == [_routed_by_the_model(edited, tokenizer, UNRELATED), len(UNRELATED)]
    taken = [w for w in caught if "unrelated texts it was trained to leave alone" in str(w.message)]
    if act_ratio < 1e-3:
        assert first[0] == second[0] == len(UNRELATED)
    assert len(taken) == (1 if first[0] or second[0] else 0)


def _toy_wise_layer(threshold: float) -> WiseLayer:
    torch.manual_seed(0)
    layer = WiseLayer(torch.nn.Linear(4, 3), "default", 1)
    layer.wise_delta["default"].data = torch.randn(1, 3, 4)
    layer.wise_threshold["default"].data.fill_(threshold)
    layer.routing = RoutingContext()
    return layer


def test_running_mean_gaps_skip_padding():
    gaps = torch.tensor([[9.0, 1.0, 3.0, 5.0]])
    valid = torch.tensor([[False, True, True, True]])
    torch.testing.assert_close(running_mean_gaps(gaps, valid), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


def test_shared_prefix_lengths_count_the_opening_tokens_a_text_shares_with_any_edit():
    rows = [[5, 6, 7, 8], [5, 9]]
    texts = [[5, 6, 7, 1, 2], [5, 9, 9], [4, 5, 6], [5, 6, 7, 8, 3], []]
    assert shared_prefix_lengths(texts, rows) == [3, 2, 0, 4, 0]
    assert shared_prefix_lengths(texts, []) == [0, 0, 0, 0, 0]


def test_the_margins_leave_out_the_opening_an_unrelated_text_shares_with_the_edit(llama, monkeypatch):
    """An unrelated text that opens like the edit's prompt: the margins see only the tokens after that
    opening (a causal model gives the opening the edit's own keys); another text loses only what it
    shares too (here the start token and "The")."""
    _, tokenizer = llama
    opening_alike = PROBE + " a town far away."
    texts = [opening_alike, UNRELATED[0]]
    seen = []

    def recording(edit_gaps, unrelated_gaps, *args, **kwargs):
        seen.append(unrelated_gaps.numel())
        return margin_loss(edit_gaps, unrelated_gaps, *args, **kwargs)

    monkeypatch.setattr("peft_edit.tuners.wise.model.margin_loss", recording)
    config = CONFIGS["wise"](unrelated_texts=texts, num_steps=2)
    get_edited_model(tiny_model("llama"), config, REQUESTS[:1], tokenizer=tokenizer, progress=False)
    edit_ids = tokenizer(join_prompt_and_target(PROBE, "Rome"))["input_ids"]
    texts_ids = [tokenizer(t)["input_ids"] for t in texts]
    shared = shared_prefix_lengths(texts_ids, [edit_ids])
    assert shared[0] >= len(tokenizer(PROBE)["input_ids"]) - 1  # the whole prompt, or all but a merged last token
    assert shared[1] < 4
    assert seen and set(seen) == {sum(len(ids) for ids in texts_ids) - sum(shared)}


@torch.no_grad()
def test_router_uses_the_running_mean_and_carries_it_across_cached_calls():
    # Tokens with growing activations: the running mean gap grows, and crosses the threshold mid-text.
    x = torch.randn(1, 6, 4) * torch.arange(1.0, 7.0)[None, :, None] ** 2
    layer = _toy_wise_layer(threshold=1.0)
    delta = layer.wise_delta["default"][0]
    token_gaps = (x @ delta.T).norm(dim=-1)[0]
    running = token_gaps.cumsum(0) / torch.arange(1, 7)
    threshold = float(running.median())
    layer.wise_threshold["default"].data.fill_(threshold)
    whole = layer(x)
    # The same text in two calls, the second continuing the first (as with a KV cache).
    layer.routing.continues = False
    first = layer(x[:, :4])
    layer.routing.continues = True
    second = layer(x[:, 4:])
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    routed = ~torch.isclose(whole, layer.base_layer(x)).all(-1)[0]
    expected = running > threshold
    assert routed.tolist() == expected.tolist()
    assert 0 < sum(expected.tolist()) < 6  # some tokens routed, some not


@torch.no_grad()
def test_router_ignores_padding():
    layer = _toy_wise_layer(threshold=1.0)
    x = torch.randn(1, 4, 4)
    padded = torch.cat([torch.randn(1, 2, 4) * 100, x], 1)  # left padding with huge activations
    with torch.no_grad():
        layer.routing.attention_mask = None
        plain = layer(x)
        layer.routing.attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
        with_padding = layer(padded)
    torch.testing.assert_close(with_padding[:, 2:], plain)


def test_running_means_of_texts_laid_end_to_end_restart_at_each_text():
    texts = [torch.rand(3), torch.rand(1), torch.rand(4)]
    expected = torch.cat([running_mean_gaps(t[None], torch.ones(1, len(t), dtype=torch.bool))[0] for t in texts])
    torch.testing.assert_close(segment_running_means(torch.cat(texts), [3, 1, 4]), expected)


@torch.no_grad()
def test_the_training_stop_check_agrees_with_the_router_on_which_texts_are_left_alone():
    layer = _toy_wise_layer(threshold=1.0)
    delta = layer.wise_delta["default"][0]
    texts = [torch.randn(1, n, 4) * scale for n, scale in [(3, 0.3), (5, 1.0), (2, 3.0)]]
    gaps = [token_gaps(t[0], delta) for t in texts]
    layer.routing.attention_mask = None
    counts = set()
    for threshold in [0.1, 1.0, 3.0, 100.0]:
        layer.wise_threshold["default"].data.fill_(threshold)
        routed = sum(not torch.equal(layer(t), layer.base_layer(t)) for t in texts)
        assert texts_routed(torch.cat(gaps), [3, 5, 2], threshold) == routed
        assert routes_apart(torch.cat(gaps), [3, 5, 2], threshold) == (routed == 0)
        counts.add(routed)
    assert len(counts) > 2  # thresholds between none and all of the texts were checked
    assert routes_apart(torch.cat(gaps), [3, 5, 2], 100.0)
    assert not routes_apart(torch.cat(gaps), [3, 5, 2], 0.1)
    # The threshold the stop check uses is the memory's: a fraction of its prompts' smallest mean gap.
    threshold = memory_threshold([t[0] for t in texts], delta, act_ratio=0.5)
    torch.testing.assert_close(threshold, 0.5 * torch.stack([g.mean() for g in gaps]).min())


def test_margins_hold_only_once_unrelated_gaps_are_below_alpha_on_average():
    edit = torch.tensor([5.0, 6.0])
    # Edit above beta and apart by gamma, but unrelated text averages above alpha: keep training.
    loss, holds = margin_loss(edit, torch.tensor([0.5, 2.5]), alpha=1.0, beta=4.0, gamma=2.0)
    assert not holds and loss.item() == pytest.approx(0.75)
    # One unrelated token above alpha is tolerated when their mean is below it.
    loss, holds = margin_loss(edit, torch.tensor([0.2, 0.2, 1.5]), alpha=1.0, beta=4.0, gamma=2.0)
    assert holds and loss.item() > 0
    # The weight scales the unrelated term only.
    weighted, _ = margin_loss(edit, torch.tensor([0.5, 2.5]), 1.0, 4.0, 2.0, unrelated_weight=10.0)
    assert weighted.item() == pytest.approx(7.5)
    # An edit below beta never holds.
    _, holds = margin_loss(torch.tensor([3.0]), torch.tensor([0.1]), 1.0, 4.0, 2.0)
    assert not holds


def test_by_default_every_full_shard_is_a_memory_of_its_own():
    # Merging is opt-in: merged shards routed unrelated text more often (README, WISE section).
    config = WiseConfig()
    assert config.placement(9) == (0, 0, 9)
    assert config.placement(10) == (1, 0, 0)
    merging = WiseConfig(shards_per_memory=2)
    assert merging.placement(10) == (0, 1, 0) and merging.placement(20) == (1, 0, 0)


def test_ties_merge_keeps_agreeing_entries_and_averages_overlaps():
    a = torch.tensor([[1.0, 0.0, -2.0, 0.5]])
    b = torch.tensor([[0.0, 3.0, 2.0, 0.5]])
    merged = ties_merge(torch.stack([a, b]), density=1.0)
    # disjoint entries kept whole; a sign conflict (-2 vs 2) elects the sum's sign (0 -> dropped); overlap averaged
    torch.testing.assert_close(merged, torch.tensor([[1.0, 3.0, 0.0, 0.5]]))
    trimmed = ties_merge(torch.stack([a, b]), density=0.5)
    torch.testing.assert_close(trimmed, torch.tensor([[1.0, 3.0, 0.0, 0.0]]))


def test_config_checks_fail_before_the_model_is_touched(llama):
    with pytest.raises(ValueError, match="mask_ratio"):
        WiseConfig(mask_ratio=0)
    with pytest.raises(ValueError, match="edit_margin"):
        WiseConfig(edit_margin=0.1, irrelevant_margin=0.2)
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam'"):
        WiseConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="stop_rule must be one of"):
        WiseConfig(stop_rule="loss")
    with pytest.raises(ValueError, match="num_steps"):
        TPatcherConfig(num_steps=0)
    _, tokenizer = llama
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="only 4 blocks"):
        get_edited_model(model, WiseConfig(layer=9), REQUESTS[:1], tokenizer=tokenizer, progress=False)
    assert not any("wise" in type(m).__name__.lower() for m in model.modules())


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_default_layers_come_from_depth(method, llama):
    _, tokenizer = llama
    edited = get_edited_model(tiny_model("llama"), CONFIGS[method](), tokenizer=tokenizer, progress=False)
    expected = {"wise": 3, "tpatcher": 3}[method]  # 4 blocks: int(4 * 27/32) = 3; T-Patcher: the last
    assert edited.peft_config["default"].target_modules == [f"model.layers.{expected}.mlp.down_proj"]


def test_with_a_compute_dtype_the_unrelated_gaps_run_in_it_and_float32_gaps_decide_the_stop(llama, monkeypatch):
    """Each step's gaps on unrelated text come from bfloat16 products; once they say the margins hold,
    gaps computed again in float32 decide. (Margins loose enough to hold on a tiny model.)"""
    import peft_edit.tuners.wise.model as wise_model

    calls = []  # ("gaps", dtype of the keys) and ("margins", whether they hold), in order
    token_gaps_of, margin_loss_of = wise_model.token_gaps, wise_model.margin_loss

    def gaps(keys, delta):
        calls.append(("gaps", keys.dtype))
        return token_gaps_of(keys, delta)

    def margins(*args, **kwargs):
        loss, holds = margin_loss_of(*args, **kwargs)
        calls.append(("margins", holds))
        return loss, holds

    def routed(*args):
        calls.append(("routed",))
        return texts_routed_of(*args)

    texts_routed_of = wise_model.texts_routed
    monkeypatch.setattr(wise_model, "token_gaps", gaps)
    monkeypatch.setattr(wise_model, "margin_loss", margins)
    monkeypatch.setattr(wise_model, "texts_routed", routed)
    _, tokenizer = llama
    loose = dict(irrelevant_margin=1.0, edit_margin=1.01, gap_margin=0.0, early_stop_loss=5.0)
    for compute_dtype, step_dtype in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        calls.clear()
        config = WiseConfig(num_steps=60, context_templates_per_length=0, compute_dtype=compute_dtype, **loose)
        get_edited_model(tiny_model("llama"), config, REQUESTS[:1], tokenizer=tokenizer, progress=False)
        # After training, the ledger's count of unrelated texts routed comes from float32 gaps.
        assert calls[-2:] == [("gaps", torch.float32), ("routed",)]
        del calls[-2:]
        steps = [i for i, call in enumerate(calls) if call == ("gaps", step_dtype)]
        assert 1 < len(steps) < 60  # training stopped on the margins
        for i in steps:
            held = calls[i + 1] == ("margins", True)
            if compute_dtype is not None and held:  # confirmed in float32
                assert calls[i + 2 : i + 4] == [("gaps", torch.float32), ("margins", True)]
        assert calls[-2:] == [("gaps", torch.float32), ("margins", True)]
