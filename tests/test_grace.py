"""GRACE on tiny models: the codebook rules, save/load, generation, merge refusal, rollback, unload.

Tiny random models test mechanics, not knowledge (test_grace_smollm2.py does that).
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from peft import PeftModel
from tiny_models import PAD_ID, tiny_model, tiny_model_and_tokenizer
from torch import nn

import peft_edit.tuners.grace.model as grace_model
from peft_edit import EditRequest, GraceConfig, get_edited_model
from peft_edit.tuners.config import EditConfig
from peft_edit.tuners.grace.algorithm import StopRule
from peft_edit.tuners.grace.bystanders import BystanderBank
from peft_edit.tuners.grace.config import default_grace_layer
from peft_edit.tuners.grace.layer import GraceLayer, Placement, clear_radii, target_label
from peft_edit.tuners.wrapped import CannotMergeError

TEMPLATE = "{} is located in the city of"
SUBJECTS = ["The Eiffel Tower", "Big Ben", "The Colosseum", "The Space Needle", "The Pantheon", "The Louvre"]
TARGETS = ["Rome", "Paris", "London", "Seattle", "Berlin", "Madrid"]
REQUESTS = [EditRequest(prompt=TEMPLATE, subject=s, target_new=t) for s, t in zip(SUBJECTS, TARGETS)]
FAST = dict(value_steps=30)


def prompt_logits(model, tokenizer, text):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0]


def greedy(model, tokenizer, text, n=2, use_cache=True):
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD_ID, use_cache=use_cache)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def target_ids(tokenizer, request):
    from peft_edit.requests import tokenize_continuation

    return tokenize_continuation(tokenizer, request.filled_prompt, request.target_new)[1]


def codebook_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("keys", "values", "radii", "labels"))


@pytest.fixture(scope="module")
def llama():
    return tiny_model_and_tokenizer("llama")


@pytest.fixture
def edited(llama):
    _, tokenizer = llama
    model = tiny_model("llama")
    return get_edited_model(
        model, GraceConfig(**FAST), requests=REQUESTS[:3], tokenizer=tokenizer, progress=False
    )


# ----------------------------------------------------------------- the codebook rules, on one layer
def layer_with(keys, radii, labels):
    layer = GraceLayer(nn.Linear(2, 3), "default", 0)
    for key, radius, label in zip(keys, radii, labels):
        layer.append(
            "default", Placement("add"), torch.tensor(key), torch.full((3,), float(label)), radius, label
        )
    return layer


def test_inputs_outside_every_radius_pass_through_unchanged():
    layer = layer_with([[0.0, 0.0], [10.0, 0.0]], [1.0, 2.0], [1, 2])
    x = torch.tensor([[[0.5, 0.0], [5.0, 0.0], [9.0, 0.5], [10.0, 2.5]]])
    out, own = layer(x), layer.base_layer(x)
    torch.testing.assert_close(out[0, 0], torch.full((3,), 1.0))  # inside key 0's radius
    torch.testing.assert_close(out[0, 2], torch.full((3,), 2.0))  # inside key 1's radius
    assert torch.equal(out[0, 1], own[0, 1]) and torch.equal(out[0, 3], own[0, 3])


def test_a_far_key_is_added_with_the_initial_radius():
    layer = layer_with([[0.0, 0.0]], [1.0], [1])
    placement = layer.placement("default", torch.tensor([5.0, 0.0]), label=2, radius=1.0, tolerance=1e-3)
    assert placement.action == "add"
    assert layer.append("default", placement, torch.tensor([5.0, 0.0]), torch.zeros(3), 1.0, 2) == (1, 2)
    assert layer.grace_radii["default"].tolist() == [1.0, 1.0]


def test_a_near_key_with_the_same_target_expands_the_stored_radius():
    layer = layer_with([[0.0, 0.0]], [1.0], [7])
    key = torch.tensor([1.5, 0.0])  # outside the radius (1.0), inside radius + initial radius (2.0)
    placement = layer.placement("default", key, label=7, radius=1.0, tolerance=1e-3)
    assert (placement.action, placement.index, placement.distance) == ("expand", 0, 1.5)
    # The new key is stored too (entry 1 answers it), with the shared, re-optimised value.
    assert layer.append("default", placement, key, torch.full((3,), 9.0), 1.0, 7) == (1, 2)
    assert layer.grace_values["default"].tolist() == [[9.0] * 3] * 2
    assert layer.grace_keys["default"][1].tolist() == key.tolist()
    # The stored ball reaches the new key with a margin: a later forward pass may round differently.
    torch.testing.assert_close(layer.grace_radii["default"], torch.tensor([1.5 + 1e-3, 1.0]))
    assert layer(torch.tensor([[0.75, 0.0], [1.5 * (1 + 1e-5), 0.0]])).tolist() == [[9.0] * 3] * 2


def test_a_split_beside_an_expanded_entry_leaves_the_expanded_prompt_its_answer():
    layer = layer_with([[0.0, 0.0]], [1.0], [7])
    expanded = torch.tensor([1.5, 0.0])
    placement = layer.placement("default", expanded, label=7, radius=1.0, tolerance=1e-3)
    layer.append("default", placement, expanded, torch.full((3,), 9.0), 1.0, 7)
    # Another target between them: had only the stored key been kept, this split would halve its ball
    # (0.52, short of the expanded key), and the expanded key lies nearer the new one (0.58) anyway.
    other = torch.tensor([1.0, 0.3])
    placement = layer.placement("default", other, label=8, radius=1.0, tolerance=1e-3)
    assert placement.action == "split"
    layer.append("default", placement, other, torch.zeros(3), 1.0, 8)
    assert layer(expanded[None])[0].tolist() == [9.0] * 3


def test_a_near_key_with_another_target_splits_the_space():
    layer = layer_with([[0.0, 0.0]], [1.0], [7])
    key = torch.tensor([1.5, 0.0])
    placement = layer.placement("default", key, label=8, radius=1.0, tolerance=1e-3)
    assert placement.action == "split"
    assert layer.append("default", placement, key, torch.zeros(3), 1.0, 8) == (1, 2)
    assert layer.grace_radii["default"].tolist() == [0.75, 0.75]
    out = layer(torch.tensor([[0.7, 0.0], [0.8, 0.0]]))
    assert out[0].tolist() == [7.0] * 3 and out[1].tolist() == [0.0] * 3  # each side answers its own


def test_the_same_prompt_edited_again_overwrites_its_entry():
    layer = layer_with([[0.0, 0.0]], [1.0], [7])
    placement = layer.placement("default", torch.tensor([0.0, 1e-5]), label=8, radius=1.0, tolerance=1e-3)
    assert placement.action == "replace"
    assert layer.append("default", placement, torch.zeros(2), torch.full((3,), 5.0), 1.0, 8) == (0, 1)
    assert layer.grace_labels["default"].tolist() == [8]
    assert layer.grace_values["default"][0].tolist() == [5.0] * 3


def test_radii_keep_clear_of_bystander_keys():
    layer = layer_with([[0.0, 0.0], [10.0, 0.0]], [1.0, 1.0], [1, 2])
    bystanders = [torch.tensor([[1.2, 0.0]]), torch.tensor([[0.0, 5.0], [10.0, 0.4]])]
    layer.keep_clear_of("default", bystanders, tolerance=1e-3)
    torch.testing.assert_close(layer.grace_radii["default"], torch.tensor([0.6, 0.2]))
    out = layer(torch.tensor([[1.2, 0.0], [10.0, 0.4], [0.5, 0.0]]))
    own = layer.base_layer(torch.tensor([[1.2, 0.0], [10.0, 0.4]]))
    assert torch.equal(out[:2], own)  # the bystanders pass through
    assert out[2].tolist() == [1.0] * 3  # what is nearer the key than they are is still answered
    layer.keep_clear_of("default", [torch.tensor([[0.0, 3.0]])], tolerance=1e-3)  # farther: no change
    torch.testing.assert_close(layer.grace_radii["default"], torch.tensor([0.6, 0.2]))
    # A bystander at the key itself (an edited prompt that begins another edited row) is its context.
    layer.keep_clear_of("default", [torch.tensor([[10.0, 0.0]])], tolerance=1e-3)
    torch.testing.assert_close(layer.grace_radii["default"], torch.tensor([0.6, 0.2]))


def test_clear_radii_of_bystanders_in_blocks_are_those_of_the_blocks_joined():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(4, 8, generator=generator)
    blocks = [torch.randn(n, 8, generator=generator) for n in (5, 0, 3, 7)]
    blocks.append(keys[1:2] * (1 + 1e-5))  # key 1's own context: not a neighbour
    joined = torch.cat(blocks)
    radii = clear_radii(keys, blocks, tolerance=1e-3)
    expected = torch.cdist(keys, joined)
    expected[1, -1] = float("inf")
    torch.testing.assert_close(radii, expected.min(dim=-1).values / 2)
    assert clear_radii(keys, [torch.empty(0, 8)], tolerance=1e-3).isinf().all()


def test_the_bystander_bank_grows_with_the_ledger_and_rebuilds_when_it_changes_otherwise():
    generator = torch.Generator().manual_seed(0)
    blocks = [(f"row {i}", i // 2, torch.randn(n, 8, generator=generator)) for i, n in enumerate((3, 0, 700, 500, 2))]
    bank = BystanderBank()
    bank.sync(blocks[:2])
    assert bank.size == 3
    bank.sync(blocks)  # appended: past the first capacity, the stored keys are carried over
    key = torch.randn(8, generator=generator)
    joined = torch.cat([keys for _, _, keys in blocks])
    torch.testing.assert_close(bank.keys, joined)
    torch.testing.assert_close(bank.distances(key), torch.cdist(key[None], joined)[0], atol=1e-4, rtol=1e-5)
    assert bank.owners.tolist() == [0] * 3 + [1] * 700 + [1] * 500 + [2] * 2
    bank.sync([blocks[0], blocks[3]])  # a block gone from the middle (a retired request): rebuilt
    torch.testing.assert_close(bank.keys, torch.cat([blocks[0][2], blocks[3][2]]))
    assert bank.owners.tolist() == [0] * 3 + [1] * 500
    bank.sync([])
    assert bank.size == 0 and bank.distances(key).shape == (0,)
    assert bank.clear_distance(key, tolerance=1e-3) == float("inf")


def test_the_bystander_bank_leaves_a_keys_own_context_out_of_its_clear_distance():
    generator = torch.Generator().manual_seed(1)
    key = torch.randn(8, generator=generator)
    others = torch.randn(4, 8, generator=generator)
    own = key + 1e-5 * torch.randn(8, generator=generator)  # the same text as the key's prompt
    bank = BystanderBank()
    bank.sync([("row 0", 0, torch.cat([others[:2], own[None]])), ("row 1", 1, others[2:])])
    assert bank.in_context(key, tolerance=1e-3).tolist() == [False, False, True, False, False]
    nearest = torch.cdist(key[None], others)[0].min()
    assert bank.clear_distance(key, tolerance=1e-3) == pytest.approx(float(nearest) / 2, rel=1e-5)


# ---------------------------------------------------------------------------- the adapter
def test_each_edit_is_emitted_and_the_ledger_names_its_entry(edited, llama):
    _, tokenizer = llama
    for i, request in enumerate(REQUESTS[:3]):
        wanted = target_ids(tokenizer, request)
        assert greedy(edited, tokenizer, request.filled_prompt, n=len(wanted)) == wanted
        assert list(edited.ledger[i]["modules"].values()) == [[i, i + 1]]
    labels = edited.base_model.codebook()["labels"].tolist()
    assert labels == [target_label(r.target_new) for r in REQUESTS[:3]]


def test_no_entry_reaches_an_edited_row_but_at_its_own_position(llama):
    # Each value was optimised with the rest of its row (earlier prompt tokens, target tokens)
    # passing through; an entry reaching one of those positions would undo the edit. A row that
    # repeats its last word and a wide radius make such positions likely.
    from peft_edit.requests import tokenize_continuation

    _, tokenizer = llama
    requests = [
        EditRequest(prompt="{} is in the city of the city of", subject="Big Ben", target_new="Rome of Rome")
    ]
    edited = get_edited_model(
        tiny_model("llama"), GraceConfig(init_radius=0.9, **FAST), requests, tokenizer, progress=False
    )
    (layer,) = [m for m in edited.modules() if isinstance(m, GraceLayer)]
    seen = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0][0]))
    try:
        for request in requests:
            prompt, target = tokenize_continuation(tokenizer, request.filled_prompt, request.target_new)
            with torch.no_grad():
                edited(input_ids=torch.tensor([prompt + target[:-1]]))
            distance, index = layer.nearest("default", seen["x"])
            hits = (distance <= layer.grace_radii["default"][index]).nonzero().flatten().tolist()
            assert hits == [len(prompt) - 1], request
    finally:
        handle.remove()


def teacher_forced_holds(model, tokenizer, request) -> bool:
    """Every target token is the argmax after the prompt and the target's earlier tokens."""
    from peft_edit.requests import tokenize_continuation

    prompt, target = tokenize_continuation(tokenizer, request.filled_prompt, request.target_new)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target[:-1]])).logits[0]
    return logits[len(prompt) - 1 :].argmax(-1).tolist() == target


def test_an_earlier_value_is_optimised_again_where_a_new_entry_answers_in_its_row(llama, monkeypatch):
    # A passage is edited, then its first sentence: the sentence's entry answers inside the
    # passage's row too (the same text), so the passage's value is optimised again, from where it
    # stood, with that entry in place.
    _, tokenizer = llama
    passage = EditRequest(
        prompt="{} is located in the city of Paris. It was built for the fair of", subject="The Eiffel Tower",
        target_new="Rome",
    )
    sentence = EditRequest(prompt=TEMPLATE, subject="The Eiffel Tower", target_new="London")
    assert passage.filled_prompt.startswith(sentence.filled_prompt)
    calls = []

    def recording(model, layout, block, layer, rows, pad_id, hp, start=None):
        answered = set()

        def note_hits(_module, args):
            if layer.size("default") == 0:
                return
            distance, index = layer.nearest("default", args[0].reshape(-1, args[0].shape[-1]))
            answered.update(index[distance <= layer.grace_radii["default"][index]].tolist())

        handle = layer.register_forward_pre_hook(note_hits)
        try:
            found = optimise_value(model, layout, block, layer, rows, pad_id, hp, start=start)
        finally:
            handle.remove()
        calls.append({"rows": rows, "start": None if start is None else start.clone(), "answered": answered})
        return found

    optimise_value = grace_model.optimise_value
    monkeypatch.setattr(grace_model, "optimise_value", recording)
    edited = get_edited_model(tiny_model("llama"), GraceConfig(**FAST), [passage], tokenizer, progress=False)
    (layer,) = [m for m in edited.modules() if isinstance(m, GraceLayer)]
    assert len(calls) == 1  # nothing earlier to optimise again
    passage_value = layer.grace_values["default"][0].clone()
    edited.edit([sentence], progress=False)

    own, again = calls[1:]
    assert own["start"] is None and again["rows"] == calls[0]["rows"]  # the sentence, then the passage
    assert torch.equal(again["start"], passage_value)
    assert 1 in again["answered"]  # the sentence's entry answered inside the passage's row
    assert teacher_forced_holds(edited, tokenizer, sentence) and teacher_forced_holds(edited, tokenizer, passage)


def test_generation_with_and_without_the_kv_cache_agree(edited, llama):
    _, tokenizer = llama
    for request in REQUESTS[:3]:
        text = request.filled_prompt
        assert greedy(edited, tokenizer, text, n=4, use_cache=True) == greedy(
            edited, tokenizer, text, n=4, use_cache=False
        )


def test_a_transformers_pipeline_emits_the_edit(edited, llama):
    from transformers import pipeline

    _, tokenizer = llama
    generate = pipeline("text-generation", model=edited, tokenizer=tokenizer)
    request = REQUESTS[1]
    text = generate(request.filled_prompt, max_new_tokens=2, do_sample=False, return_full_text=False)
    assert text[0]["generated_text"].strip().startswith(request.target_new)


def test_disable_adapter_switches_the_codebook_off(edited, llama):
    _, tokenizer = llama
    text = REQUESTS[0].filled_prompt
    original = prompt_logits(tiny_model("llama"), tokenizer, text)
    assert (prompt_logits(edited, tokenizer, text) - original).abs().max() > 1e-3
    with edited.disable_adapter():
        torch.testing.assert_close(prompt_logits(edited, tokenizer, text), original, atol=0, rtol=0)


@pytest.mark.parametrize("n_edits", [0, 1, 4])
def test_the_codebook_round_trips_through_save_and_load(llama, tmp_path, n_edits):
    _, tokenizer = llama
    edited = get_edited_model(
        tiny_model("llama"), GraceConfig(**FAST), requests=REQUESTS[:n_edits] or None, tokenizer=tokenizer
    )
    edited.save_pretrained(tmp_path / "grace")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "grace")
    assert codebook_equal(reloaded.base_model.codebook(), edited.base_model.codebook())
    assert reloaded.base_model.codebook()["keys"].shape[0] == n_edits
    for request in REQUESTS[:4]:
        text = request.filled_prompt
        torch.testing.assert_close(
            prompt_logits(reloaded, tokenizer, text), prompt_logits(edited, tokenizer, text)
        )
    # The reloaded adapter keeps growing where the saved one stopped.
    reloaded.edit([REQUESTS[5]], tokenizer=tokenizer, progress=False)
    assert list(reloaded.ledger[-1]["modules"].values()) == [[n_edits, n_edits + 1]]


def test_merge_and_unload_raises_a_clear_error_and_changes_nothing(edited, llama):
    _, tokenizer = llama
    text = REQUESTS[0].filled_prompt
    expected = prompt_logits(edited, tokenizer, text)
    with pytest.raises(CannotMergeError, match="GRACE edits live in a codebook beside the weights"):
        edited.merge_and_unload()
    with pytest.raises(CannotMergeError, match="unload_edits"):
        edited.merge_adapter()
    torch.testing.assert_close(prompt_logits(edited, tokenizer, text), expected, atol=0, rtol=0)


def test_a_failed_edit_restores_the_codebook_including_changed_radii(edited, llama, monkeypatch):
    _, tokenizer = llama
    before, ledger = edited.base_model.codebook(), edited.ledger
    # The same prompt with the same target expands (or overwrites) a stored entry in place; the
    # edit after it fails, so the whole call must be undone.
    again = dataclasses.replace(REQUESTS[0], prompt="{} is located in the town of")
    real, calls = grace_model.optimise_value, []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("planned failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(grace_model, "optimise_value", fail_on_second)
    with pytest.raises(RuntimeError, match="planned"):
        edited.edit([again, REQUESTS[4]], progress=False)
    assert codebook_equal(edited.base_model.codebook(), before)
    assert edited.ledger == ledger


def test_each_request_is_tokenized_once_however_many_edits_reread_the_ledger(llama, monkeypatch):
    _, tokenizer = llama
    tokenized = []
    real = grace_model.tokenize_continuation

    def counting(tok, prompt, target):
        tokenized.append((prompt, target))
        return real(tok, prompt, target)

    monkeypatch.setattr(grace_model, "tokenize_continuation", counting)
    monkeypatch.setattr(grace_model, "_ROWS", weakref.WeakKeyDictionary())  # nothing remembered yet
    edited = get_edited_model(
        tiny_model("llama"), GraceConfig(**FAST), requests=REQUESTS[:1], tokenizer=tokenizer, progress=False
    )
    for request in REQUESTS[1:4]:
        edited.edit([request], progress=False)
    # Four edits, each reading every earlier request again (radius and refits), tokenized once each.
    assert sorted(tokenized) == sorted((r.filled_prompt, r.target_new) for r in REQUESTS[:4])
    ids = grace_model.request_row(tokenizer, REQUESTS[2])
    assert ids == real(tokenizer, REQUESTS[2].filled_prompt, REQUESTS[2].target_new)
    ids[0].append(-1)  # a caller changing its copy leaves the remembered ids alone
    assert grace_model.request_row(tokenizer, REQUESTS[2]) != ids


def test_unload_edits_is_bit_identical(edited, llama):
    _, tokenizer = llama
    before = tiny_model("llama").state_dict()
    base = edited.unload_edits()
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------ the config
def test_defaults_need_no_per_model_settings():
    assert [default_grace_layer(d) for d in (4, 12, 30, 32)] == [3, 10, 24, 26]
    inherited = {f.name for f in dataclasses.fields(EditConfig)}
    own = [f for f in dataclasses.fields(GraceConfig) if f.name not in inherited]
    assert own and all(f.metadata.get("help") for f in own), [
        f.name for f in own if not f.metadata.get("help")
    ]


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "phi"])
def test_other_families_wrap_their_mlp_and_emit_the_edit(family):
    model, tokenizer = tiny_model_and_tokenizer(family)
    edited = get_edited_model(
        model, GraceConfig(**FAST), requests=REQUESTS[:2], tokenizer=tokenizer, progress=False
    )
    (name,) = edited.peft_config["default"].target_modules
    assert name.endswith("fc2" if family == "opt" else "mlp")
    for request in REQUESTS[:2]:
        wanted = target_ids(tokenizer, request)
        assert greedy(edited, tokenizer, request.filled_prompt, n=len(wanted)) == wanted


def test_a_layer_beyond_the_model_fails_before_touching_it(llama):
    _, tokenizer = llama
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="only 4 blocks"):
        get_edited_model(model, GraceConfig(layer=7), requests=REQUESTS[:1], tokenizer=tokenizer)
    assert not any(isinstance(m, GraceLayer) for m in model.modules())


def test_a_stop_margin_ends_the_value_optimisation_once_each_token_leads_and_no_later(llama, grace_value_steps):
    _, tokenizer = llama
    request = REQUESTS[0]
    wanted = target_ids(tokenizer, request)
    slow = dict(value_steps=60, value_lr=0.2)  # small steps, so the two rules stop apart
    for config in (GraceConfig(**slow), GraceConfig(**slow, stop_margin=0.1)):
        edited = get_edited_model(tiny_model("llama"), config, requests=[request], tokenizer=tokenizer, progress=False)
        assert greedy(edited, tokenizer, request.filled_prompt, n=len(wanted)) == wanted
    by_probability, by_margin = grace_value_steps
    assert by_margin < by_probability < 60
    with pytest.raises(ValueError, match="stop_margin"):
        GraceConfig(stop_margin=-0.5)


def test_a_bfloat16_value_optimisation_emits_the_edit_and_leaves_the_weights_float32(llama):
    _, tokenizer = llama
    model = tiny_model("llama")
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = GraceConfig(**FAST, compute_dtype="bfloat16")
    edited = get_edited_model(model, config, requests=REQUESTS[:2], tokenizer=tokenizer, progress=False)
    for request in REQUESTS[:2]:
        wanted = target_ids(tokenizer, request)
        assert greedy(edited, tokenizer, request.filled_prompt, n=len(wanted)) == wanted
    for name, p in model.named_parameters():
        if name in weights:
            assert p.dtype == torch.float32 and torch.equal(p, weights[name]), name
    assert edited.codebook()["values"].dtype == torch.float32


def test_the_mean_stop_rule_wants_every_token_on_top_and_each_rows_mean_above_the_bar():
    class Measured:  # what TargetLogProbs records of its last call
        def __init__(self, leads):
            self.leads = torch.tensor(leads)

    half = torch.tensor(0.5).log().item()
    two_rows = StopRule("mean", half, None, rows=torch.tensor([0, 0, 1]))
    # Row 0: -0.1 and -0.9 average -0.5, above log 0.5 though the second token alone is below it.
    assert two_rows(torch.tensor([-0.1, -0.9, -0.2]), Measured([2.0, 0.3, 1.0]))
    assert not two_rows(torch.tensor([-0.1, -0.9, -0.2]), Measured([2.0, -0.1, 1.0]))  # one token beaten
    assert not two_rows(torch.tensor([-0.1, -0.9, -0.8]), Measured([2.0, 0.3, 0.1]))  # row 1's mean too low
    with_margin = StopRule("mean", half, 0.5, rows=torch.tensor([0, 0, 1]))
    assert not with_margin(torch.tensor([-0.1, -0.9, -0.2]), Measured([2.0, 0.3, 1.0]))
    every_token = StopRule("every_token", half, None, rows=torch.tensor([0, 0, 1]))
    assert not every_token(torch.tensor([-0.1, -0.9, -0.2]), Measured([2.0, 0.3, 1.0]))
    with pytest.raises(ValueError, match="stop_rule"):
        GraceConfig(stop_rule="loss")

