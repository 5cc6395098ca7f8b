"""A request that contradicts an earlier one in the same adapter replaces it, and the ledger says so."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model_and_tokenizer

from peft_edit import EditRequest, MemitConfig, RomeConfig, get_edited_model

FAST = dict(
    stats_corpus="identity", v_num_steps=3, context_template_lengths=[3], context_templates_per_length=1
)
ROME_ON = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
LONDON = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower", target_new="London"
)
OTHER = EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Paris")


@pytest.mark.parametrize(
    "config", [RomeConfig(**FAST), MemitConfig(layers=[1, 2], **FAST)], ids=["rome", "memit"]
)
def test_a_contradicting_request_replaces_the_earlier_one(config):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(model, config, requests=[ROME_ON, OTHER], tokenizer=tokenizer, progress=False)
    first_entry = 0
    held = edited.peft_config["default"].edits
    rome_slice = {name: span for name, span in held[first_entry]["modules"].items()}

    # Same fact (the same prompt, written in the other form), another target.
    (entry,) = edited.edit([LONDON], progress=False)

    held = edited.peft_config["default"].edits
    replaced = held[first_entry]["requests"][0]
    assert replaced["replaced_by"] == len(held) - 1
    assert entry["replaces"] == [{"entry": 0, "request": 0, "target_new": "Rome", "removed": True}]
    assert [
        r.target_new for r in edited.base_model.peft_config["default"].requests(include_replaced=False)
    ] == [
        "Paris",
        "London",
    ]
    assert len(edited.edited_requests()) == 3  # the full history stays listed
    # The replaced request's own components are gone from every module; the other request's stay.
    for name, (start, _) in rome_slice.items():
        layer = edited.base_model.model.get_submodule(name)
        assert torch.count_nonzero(layer.delta_B["default"][:, start]) == 0
        assert torch.count_nonzero(layer.delta_B["default"][:, start + 1 :]) > 0


def test_contradicting_requests_in_one_call_are_refused_before_editing():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(
        model, RomeConfig(**FAST), requests=[OTHER], tokenizer=tokenizer, progress=False
    )
    with pytest.raises(ValueError, match="different targets"):
        edited.edit([ROME_ON, LONDON], progress=False)
    assert len(edited.peft_config["default"].edits) == 1


def test_a_failed_replacing_edit_restores_the_replaced_request(monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(
        model, RomeConfig(**FAST), requests=[ROME_ON], tokenizer=tokenizer, progress=False
    )
    before = [dict(r) for e in edited.peft_config["default"].edits for r in e["requests"]]
    layer_name = edited.peft_config["default"].target_modules[0]
    B_before = edited.base_model.model.get_submodule(layer_name).delta_B["default"].clone()

    def explode(*args, **kwargs):
        raise RuntimeError("optimisation failed")

    monkeypatch.setattr(type(edited.base_model), "compute_edit", explode)
    with pytest.raises(RuntimeError, match="optimisation failed"):
        edited.edit([LONDON], progress=False)
    after = [dict(r) for e in edited.peft_config["default"].edits for r in e["requests"]]
    assert after == before  # no replaced_by left behind
    assert torch.equal(edited.base_model.model.get_submodule(layer_name).delta_B["default"], B_before)
