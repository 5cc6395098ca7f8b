"""Weight-delta edits as adapters on tiny models of every family: the mechanics, not knowledge.

One matrix of (method x family x behaviour): the edit changes the output at the edited prompt;
save and a fresh load give the same logits; merge_and_unload equals the adapter's forward; unload
gives back bit-identical weights; the stock-LoRA export reloads in peft with the same logits.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny_models import (
    FAMILIES,
    assert_state_unchanged,
    logits,
    state,
    tiny_model,
    tiny_model_and_tokenizer,
    training_corpus,
)

from peft_edit import AlphaEditConfig, EditRequest, MemitConfig, RomeConfig, get_edited_model

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
BATCH = [
    REQUEST,
    EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Paris"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
]

# Few steps and no covariance: tiny random models test the mechanics, not edit quality (the
# real-model tests do that).
FAST = dict(
    stats_corpus="identity", v_num_steps=5, context_template_lengths=[3], context_templates_per_length=2
)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "wiki.txt"
    path.write_text("\n".join(training_corpus(200)))
    return str(path)


def method_config(method: str, corpus: str, cache: str):
    if method == "rome":
        return RomeConfig(**FAST), [REQUEST]
    if method == "memit":
        return MemitConfig(layers=[1, 2], **FAST), BATCH
    stats = dict(stats_corpus=corpus, stats_samples=400, stats_cache_dir=cache)
    return AlphaEditConfig(layers=[1, 2], **{**FAST, **stats}), BATCH


METHOD_FAMILIES = [(m, f) for m in ("rome", "memit", "alphaedit") for f in FAMILIES]


@pytest.fixture(scope="module", params=METHOD_FAMILIES, ids=[f"{m}-{f}" for m, f in METHOD_FAMILIES])
def edited_family(request, corpus_file, tmp_path_factory):
    method, family = request.param
    model, tokenizer = tiny_model_and_tokenizer(family)
    before_logits = logits(model, tokenizer)
    before_state = state(model)
    config, requests = method_config(method, corpus_file, str(tmp_path_factory.mktemp("stats")))
    edited = get_edited_model(model, config, requests=requests, tokenizer=tokenizer, progress=False)
    return f"{method}/{family}", tokenizer, edited, before_logits, before_state


def test_edit_changes_the_edited_prompt(edited_family):
    family, tokenizer, edited, before, _ = edited_family
    after = logits(edited, tokenizer)
    assert (after - before).abs().max() > 1e-3, family
    config = edited.peft_config["default"]
    (entry,) = config.edits
    n = len(entry["requests"])
    assert entry["requests"] == [r.to_dict() for r in BATCH[:n]]
    # One rank-one component per request in every edited projection.
    assert list(entry["modules"].values()) == [[0, n]] * len(config.target_modules)


def test_disable_adapter_gives_the_original_outputs(edited_family):
    _, tokenizer, edited, before, _ = edited_family
    with edited.disable_adapter():
        torch.testing.assert_close(logits(edited, tokenizer), before, atol=1e-5, rtol=1e-5)


def test_save_then_fresh_load_reproduces_logits(edited_family, tmp_path):
    family, tokenizer, edited, _, _ = edited_family
    edited.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    reloaded = PeftModel.from_pretrained(tiny_model(family.split("/")[1]), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(edited, tokenizer), atol=1e-5, rtol=1e-5)
    assert reloaded.peft_config["default"].edits == edited.peft_config["default"].edits


def test_merge_and_unload_equals_adapter_forward(edited_family):
    family, tokenizer, edited, _, _ = edited_family
    import tempfile

    from peft_edit import load_edited_model  # a second copy, so the shared fixture stays unmerged

    with tempfile.TemporaryDirectory() as d:
        edited.save_pretrained(d)
        copy = load_edited_model(tiny_model(family.split("/")[1]), d)
    expected = logits(copy, tokenizer)
    merged = copy.merge_and_unload()
    assert not any("delta" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)


def test_lora_export_reloads_in_plain_peft(edited_family, tmp_path):
    family, tokenizer, edited, _, _ = edited_family
    edited.save_as_lora(tmp_path / "lora")
    import json

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(tiny_model(family.split("/")[1]), tmp_path / "lora")
    torch.testing.assert_close(logits(lora, tokenizer), logits(edited, tokenizer), atol=1e-4, rtol=1e-4)


def test_unload_edits_is_bit_identical(edited_family):
    # Runs last for each family: it removes the adapter from the shared fixture.
    family, tokenizer, edited, before_logits, before_state = edited_family
    edited.merge_adapter()
    edited.unmerge_adapter()
    edited.merge_adapter()  # left merged on purpose: unload must restore the exact weights anyway
    base = edited.unload_edits()
    assert_state_unchanged(base, before_state, family)
    torch.testing.assert_close(logits(base, tokenizer), before_logits, atol=0, rtol=0)


def test_sequential_edits_at_the_first_block_grow_the_rank():
    # Block 0's projection is wrapped after the first edit; the layout must still be found.
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(model, RomeConfig(layer=0, **FAST), requests=[REQUEST], tokenizer=tokenizer)
    second = EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Paris")
    edited.edit([second], progress=False)
    assert [list(e["modules"].values())[0] for e in edited.ledger] == [[0, 1], [1, 2]]
    assert [r.subject for r in edited.edited_requests()] == ["The Eiffel Tower", "Big Ben"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edits_switch_to_a_dense_delta_once_it_is_smaller(family, tmp_path):
    # Tiny MLP output projections are 176 -> 64: factors of rank r take r * 240 numbers, the
    # matrix 11,264, so from rank 47 on the layer stores one dense delta.
    model, tokenizer = tiny_model_and_tokenizer(family)
    before = state(model)
    towns = [
        EditRequest(prompt="{} is located in the city of", subject=f"Tower number {i}", target_new="Rome")
        for i in range(60)
    ]
    config = MemitConfig(layers=[1], **{**FAST, "v_num_steps": 2})
    edited = get_edited_model(model, config, requests=towns[:30], tokenizer=tokenizer, progress=False)
    (name,) = edited.peft_config["default"].target_modules
    layer = edited.base_model.model.get_submodule(name)
    assert not layer.is_dense("default") and layer.rank("default") == 30
    low_rank_delta = layer.get_delta_weight("default").clone()

    edited.edit(towns[30:], progress=False)
    assert layer.is_dense("default") and layer.rank("default") == 60
    assert layer.delta_A["default"].numel() == 0
    assert [e["modules"][name] for e in edited.ledger] == [[0, 30], [30, 60]]
    assert not torch.allclose(layer.get_delta_weight("default"), low_rank_delta)
    expected = logits(edited, tokenizer)

    edited.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model(family), tmp_path / "adapter")
    assert reloaded.base_model.model.get_submodule(name).is_dense("default")
    torch.testing.assert_close(logits(reloaded, tokenizer), expected, atol=1e-5, rtol=1e-5)

    edited.save_as_lora(tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_model(family), tmp_path / "lora")
    torch.testing.assert_close(logits(lora, tokenizer), expected, atol=1e-4, rtol=1e-4)

    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)

    base = edited.unload_edits()
    for key, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[key]), key
