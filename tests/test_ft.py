"""FT-L / FT-M: the config's checks, the two losses, and the adapter mechanics on tiny models.

One matrix of (family x delta form) for the mechanics: the edit changes the output and its
ledger entry; disabling restores the original; save and a fresh load give the same logits;
merge_and_unload equals the adapter's forward; the stock-LoRA export reloads in plain peft;
sequential edits compose; unload gives back bit-identical weights.
"""

from __future__ import annotations

import json
import math
import tempfile

import pytest
import torch
from peft import PeftModel
from tiny_models import FAMILIES, assert_state_unchanged, logits, state, tiny_model, tiny_model_and_tokenizer

from peft_edit import EditRequest, FTConfig, UnsupportedModelError, get_edited_model, load_edited_model
from peft_edit.architectures import get_layout
from peft_edit.requests import tokenize_continuation
from peft_edit.tuners.ft.algorithm import (
    TrainableDelta,
    masked_target_rows,
    prompt_last_rows,
    train_deltas,
)

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
SECOND = EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Paris")
# A target of several tokens, so FT-L's and FT-M's losses differ.
LONG = EditRequest(
    prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome in Italy"
)

# Tiny random models need a larger step than real ones to move their outputs in a few steps; the
# early stop is loose so an edit finishes quickly once its target is likely. Block 1, not the
# default last block: tiny Gemma 2 normalises the MLP's output (post-feedforward norm), and in its
# last block that output is too small beside the residual stream to move the prediction.
FAST = dict(lr=1e-2, num_steps=80, early_stop_loss=1.0, layers=[1])
FORMS = {"dense": None, "rank2": 2}


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(variant="ft-x"), "ft-l, ft-m"),
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=-3), "rank must be a positive integer"),
        (dict(rank=2.5), "rank must be a positive integer"),
        (dict(num_steps=0), "num_steps must be an integer >= 1"),
        (dict(lr=0.0), "lr must be a positive number"),
        (dict(lr=float("nan")), "lr must be a positive number"),
        (dict(norm_constraint=0.0), "norm_constraint must be positive"),
        (dict(variant="ft-l", norm_constraint=-1e-3), "norm_constraint must be positive"),
        (dict(layers=[]), "non-empty list of block indices"),
        (dict(layers=[-1]), "non-empty list of block indices"),
        (dict(layers=[2, 2]), "lists a block twice"),
        (dict(early_stop_loss=-1.0), "early_stop_loss must be >= 0"),
    ],
)
def test_bad_config_values_fail_clearly(fields, message):
    with pytest.raises(ValueError, match=message):
        FTConfig(**fields)


def test_variant_names_are_normalised_and_ft_l_gets_its_constraint():
    assert FTConfig().variant == "ft-m"
    assert FTConfig().norm_constraint is None  # FT-M is unconstrained unless asked
    config = FTConfig(variant="FT_L")
    assert config.variant == "ft-l"
    assert config.norm_constraint is not None and config.norm_constraint > 0
    assert FTConfig(layers=3).layers == [3]


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(layers=[7]), UnsupportedModelError, "only 4 blocks"),
        (dict(target_modules=["lm_head"]), UnsupportedModelError, "not inside one"),
        (dict(target_modules=["model.layers.1.mlp.act_fn"]), UnsupportedModelError, "Linear or Conv1D"),
    ],
)
def test_bad_targets_fail_before_the_model_is_touched(fields, error, message):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    before = state(model)
    with pytest.raises(error, match=message):
        get_edited_model(model, FTConfig(**fields), requests=[REQUEST], tokenizer=tokenizer, progress=False)
    assert not any("delta" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_default_layer_is_two_thirds_of_the_depth():
    model, _ = tiny_model_and_tokenizer("llama")  # 4 blocks
    config = FTConfig()
    config.resolve(model)
    assert config.layers == [3] and config.target_modules == ["model.layers.3.mlp.down_proj"]


# ------------------------------------------------------------------------------------ the loss
def _rows_and_nll(variant_rows, model, tokenizer, request):
    """The loss the training loop measures at step 1 (ΔW = 0): the unedited model's loss."""
    layout = get_layout(model)
    name = "model.layers.2.mlp.down_proj"
    site = model.get_submodule(name)
    delta = TrainableDelta(site, None, torch.Generator().manual_seed(0))
    rows = variant_rows(tokenizer, [request])
    result = train_deltas(model, layout, {name: (2, site)}, {name: delta}, rows, 1, 1e-3, 0.0, None)
    return rows, result.nll


def test_ft_m_loss_is_the_targets_conditional_nll():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    rows, nll = _rows_and_nll(masked_target_rows, model, tokenizer, LONG)
    prompt_ids, target_ids = tokenize_continuation(tokenizer, LONG.filled_prompt, LONG.target_new)
    assert len(target_ids) > 1
    # Each target token is predicted at the position before it.
    assert rows.predicts == [[(len(prompt_ids) - 1 + j, t) for j, t in enumerate(target_ids)]]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + target_ids])).logits[0].float(), -1)
    expected = -torch.stack([logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(target_ids)]).mean()
    assert nll == pytest.approx(expected.item(), rel=1e-4)


def test_ft_l_loss_scores_every_target_token_at_the_prompts_last_position():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    rows, nll = _rows_and_nll(prompt_last_rows, model, tokenizer, LONG)
    prompt_ids, target_ids = tokenize_continuation(tokenizer, LONG.filled_prompt, LONG.target_new)
    assert rows.batch.input_ids.shape[1] == len(prompt_ids)  # the model reads the prompt alone
    assert rows.predicts == [[(len(prompt_ids) - 1, t) for t in target_ids]]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, -1].float(), -1)
    expected = -logp[target_ids].mean()
    assert nll == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("rank", [None, 3])
def test_norm_constraint_bounds_every_element_of_the_change(rank):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    bound = 1e-3
    config = FTConfig(
        variant="ft-l", rank=rank, norm_constraint=bound, lr=1e-2, num_steps=5, early_stop_loss=0.0
    )
    edited = get_edited_model(model, config, requests=[REQUEST], tokenizer=tokenizer, progress=False)
    (name,) = edited.peft_config["default"].target_modules
    delta = edited.base_model.model.get_submodule(name).delta_out_in("default")
    largest = delta.abs().max().item()
    assert bound * 0.5 < largest <= bound * (1 + 1e-5)  # it moved, and no further than allowed
    edited.unload_edits()


def test_several_layers_are_trained_together():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    config = FTConfig(**{**FAST, "layers": [1, 3]})
    edited = get_edited_model(model, config, requests=[REQUEST], tokenizer=tokenizer, progress=False)
    (entry,) = edited.ledger
    assert sorted(entry["modules"]) == ["model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    for name in entry["modules"]:
        assert edited.base_model.model.get_submodule(name).delta_out_in("default").abs().max() > 0, name


def test_other_projections_inside_the_blocks_can_be_targeted():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    before = logits(model, tokenizer)
    target = "model.layers.2.self_attn.o_proj"
    config = FTConfig(**{**FAST, "layers": None}, target_modules=[target], rank=2)
    edited = get_edited_model(model, config, requests=[REQUEST], tokenizer=tokenizer, progress=False)
    assert list(edited.ledger[0]["modules"]) == [target]
    assert (logits(edited, tokenizer) - before).abs().max() > 1e-3


def test_all_requests_of_one_call_are_trained_as_one_edit():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(
        model, FTConfig(rank=2, **FAST), requests=[REQUEST, SECOND], tokenizer=tokenizer, progress=False
    )
    (entry,) = edited.ledger
    assert [r["subject"] for r in entry["requests"]] == ["The Eiffel Tower", "Big Ben"]
    assert list(entry["modules"].values()) == [[0, 2]]


# --------------------------------------------------------------------------- adapter mechanics
@pytest.fixture(
    scope="module", params=[(f, form) for form in FORMS for f in FAMILIES], ids=lambda p: f"{p[0]}-{p[1]}"
)
def edited_family(request):
    family, form = request.param
    model, tokenizer = tiny_model_and_tokenizer(family)
    before_logits = logits(model, tokenizer)
    before_state = state(model)
    config = FTConfig(rank=FORMS[form], **FAST)
    edited = get_edited_model(model, config, requests=[REQUEST], tokenizer=tokenizer, progress=False)
    return family, form, tokenizer, edited, before_logits, before_state


def test_edit_changes_the_edited_prompt(edited_family):
    family, form, tokenizer, edited, before, _ = edited_family
    assert (logits(edited, tokenizer) - before).abs().max() > 1e-3, family
    (entry,) = edited.peft_config["default"].edits
    assert entry["requests"] == [REQUEST.to_dict()]
    ((name, span),) = entry["modules"].items()
    layer = edited.base_model.model.get_submodule(name)
    assert span == [0, 2 if form == "rank2" else layer.dense_from_rank]
    assert layer.is_dense("default") == (form == "dense")


def test_disable_adapter_gives_the_original_outputs(edited_family):
    _, _, tokenizer, edited, before, _ = edited_family
    with edited.disable_adapter():
        torch.testing.assert_close(logits(edited, tokenizer), before, atol=1e-5, rtol=1e-5)


def test_save_then_fresh_load_reproduces_logits(edited_family, tmp_path):
    family, _, tokenizer, edited, _, _ = edited_family
    edited.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["variant"] == "ft-m" and saved["rank"] == edited.peft_config["default"].rank
    reloaded = PeftModel.from_pretrained(tiny_model(family), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(edited, tokenizer), atol=1e-5, rtol=1e-5)
    assert reloaded.peft_config["default"].edits == edited.peft_config["default"].edits


def test_merge_and_unload_equals_adapter_forward(edited_family):
    family, _, tokenizer, edited, _, _ = edited_family
    with tempfile.TemporaryDirectory() as d:  # a second copy, so the shared fixture stays unmerged
        edited.save_pretrained(d)
        copy = load_edited_model(tiny_model(family), d)
    expected = logits(copy, tokenizer)
    merged = copy.merge_and_unload()
    assert not any("delta" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)


def test_lora_export_reloads_in_plain_peft(edited_family, tmp_path):
    family, _, tokenizer, edited, _, _ = edited_family
    edited.save_as_lora(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(tiny_model(family), tmp_path / "lora")
    torch.testing.assert_close(logits(lora, tokenizer), logits(edited, tokenizer), atol=1e-4, rtol=1e-4)


def test_sequential_edits_compose(edited_family):
    family, form, tokenizer, edited, _, _ = edited_family
    (name,) = edited.peft_config["default"].target_modules
    layer = edited.base_model.model.get_submodule(name)
    first = layer.delta_out_in("default").detach().clone()
    first_A = layer.delta_A["default"].detach().clone()
    # The same request again: computed on the model as edited, its loss is already below the
    # early stop, so the second edit adds nothing (on the unedited model it would train).
    edited.edit([REQUEST], progress=False)
    torch.testing.assert_close(layer.delta_out_in("default"), first, atol=1e-6, rtol=0)
    # Another request: trained on top, the earlier delta kept as it was.
    edited.edit([SECOND], progress=False)
    if form == "rank2":
        assert torch.equal(layer.delta_A["default"][:2], first_A)
        assert [list(e["modules"].values())[0] for e in edited.ledger] == [[0, 2], [2, 4], [4, 6]]
    assert (layer.delta_out_in("default") - first).abs().max() > 0, family
    assert [r.subject for r in edited.edited_requests()] == [
        "The Eiffel Tower",
        "The Eiffel Tower",
        "Big Ben",
    ]


def test_unload_edits_is_bit_identical(edited_family):
    # Runs last for each family: it removes the adapter from the shared fixture.
    family, _, tokenizer, edited, before_logits, before_state = edited_family
    edited.merge_adapter()  # left merged on purpose: unload must restore the exact weights anyway
    base = edited.unload_edits()
    assert_state_unchanged(base, before_state, family)
    torch.testing.assert_close(logits(base, tokenizer), before_logits, atol=0, rtol=0)


def test_unbounded_ft_l_round_trips_through_the_saved_config(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer("gpt2")
    config = FTConfig(variant="ft-l", norm_constraint=math.inf, rank=1, **FAST)
    edited = get_edited_model(model, config, requests=[REQUEST], tokenizer=tokenizer, progress=False)
    edited.save_pretrained(tmp_path / "a")
    reloaded = load_edited_model(tiny_model("gpt2"), tmp_path / "a")
    assert reloaded.peft_config["default"].norm_constraint == math.inf
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(edited, tokenizer), atol=1e-5, rtol=1e-5)


def test_a_contradicting_edit_removes_an_ft_edit_only_when_it_held_that_request_alone():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    config = FTConfig(rank=2, **FAST)
    edited = get_edited_model(model, config, requests=[REQUEST, SECOND], tokenizer=tokenizer, progress=False)
    (name,) = edited.peft_config["default"].target_modules
    layer = edited.base_model.model.get_submodule(name)
    shared = layer.delta_out_in("default").detach().clone()
    # The first edit is one delta for both requests: replacing one of them cannot take out a part.
    edited.edit(
        [EditRequest(prompt=REQUEST.prompt, subject=REQUEST.subject, target_new="Berlin")], progress=False
    )
    assert edited.ledger[-1]["replaces"][0]["removed"] is False
    assert torch.equal(layer.delta_B["default"][:, :2] @ layer.delta_A["default"][:2], shared)
    # An edit that holds its request alone is taken out whole.
    edited.edit(
        [EditRequest(prompt=REQUEST.prompt, subject=REQUEST.subject, target_new="Madrid")], progress=False
    )
    assert edited.ledger[-1]["replaces"][0]["removed"] is True
    assert not layer.delta_B["default"][:, 2:4].any()
