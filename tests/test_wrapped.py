"""The wrapped-adapter base on its own, through a toy method that wraps a whole MLP (no ``.weight``).

The toy adds one stored vector per edit to the MLP's output. It exercises what every wrapped
method inherits: sizes rebuilt from the ledger on load, merge refused with a clear error before
anything changes, disable_adapter, rollback by snapshot/restore, unload bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel
from tiny_models import tiny_model, tiny_model_and_tokenizer
from torch import nn

from peft_edit import EditRequest, get_edited_model, register_edit_method
from peft_edit.tuners.config import EditConfig
from peft_edit.tuners.wrapped import CannotMergeError, WrappedLayer, WrappedTuner

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
PROBE = "The Eiffel Tower is located in the city of"


class OffsetLayer(WrappedLayer):
    adapter_layer_names = ("offsets",)
    method_title = "Offset"
    storage = "stored vectors"

    def create_adapter_state(self, adapter_name, size):
        hidden = self.base_layer.down_proj.out_features
        self.offsets = getattr(self, "offsets", nn.ParameterDict({}))
        self.offsets[adapter_name] = nn.Parameter(
            torch.zeros(size, hidden, **self.state_factory()), requires_grad=False
        )

    def size(self, adapter_name):
        return self.offsets[adapter_name].shape[0]

    def apply(self, adapter_name, x, output):
        return output + self.offsets[adapter_name].sum(0)

    def append(self, adapter_name, vector):
        old = self.offsets[adapter_name]
        self.offsets[adapter_name] = nn.Parameter(torch.cat([old, vector[None].to(old)]), requires_grad=False)
        return old.shape[0], old.shape[0] + 1


@dataclass
class OffsetConfig(EditConfig):
    method = "offset-test"

    def choose_target_modules(self, model):
        return ["model.layers.1.mlp"]


class OffsetTuner(WrappedTuner):
    prefix = "offset_"
    tuner_layer_cls = OffsetLayer
    fail_next = False

    def compute_edit(self, config, requests, tokenizer):
        if OffsetTuner.fail_next:
            raise RuntimeError("planned failure")
        generator = torch.Generator().manual_seed(len(config.edits))
        return {"model.layers.1.mlp": (torch.randn(64, generator=generator),)}


register_edit_method("offset-test", OffsetConfig, OffsetTuner)


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits[0, -1]


@pytest.fixture
def edited():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = logits(model, tokenizer)
    edited = get_edited_model(
        model, OffsetConfig(), requests=[REQUEST, REQUEST], tokenizer=tokenizer, progress=False
    )
    return edited, tokenizer, before, original


def test_edits_change_the_output_and_disable_switches_them_off(edited):
    model, tokenizer, _, original = edited
    assert (logits(model, tokenizer) - original).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, tokenizer), original, atol=0, rtol=0)
    assert [list(e["modules"].values())[0] for e in model.ledger] == [[0, 1], [1, 2]]


@pytest.mark.parametrize("n_edits", [0, 1, 3])
def test_save_and_fresh_load_rebuild_the_size_from_the_ledger(tmp_path, n_edits):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(
        model, OffsetConfig(), requests=[REQUEST] * n_edits or None, tokenizer=tokenizer
    )
    edited.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    layer = reloaded.base_model.model.model.layers[1].mlp
    assert isinstance(layer, OffsetLayer) and layer.size("default") == n_edits
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(edited, tokenizer), atol=0, rtol=0)


def test_merge_is_refused_before_anything_changes(edited):
    model, tokenizer, _, _ = edited
    expected = logits(model, tokenizer)
    with pytest.raises(CannotMergeError, match="cannot be merged.*unload_edits"):
        model.merge_and_unload()
    with pytest.raises(CannotMergeError, match="Offset edits live in stored vectors"):
        model.merge_adapter()
    assert isinstance(model.base_model.model.model.layers[1].mlp, OffsetLayer)
    torch.testing.assert_close(logits(model, tokenizer), expected, atol=0, rtol=0)


def test_a_failed_edit_restores_the_state(edited):
    model, tokenizer, _, _ = edited
    expected = logits(model, tokenizer)
    OffsetTuner.fail_next = True
    try:
        with pytest.raises(RuntimeError, match="planned"):
            model.edit([REQUEST], progress=False)
    finally:
        OffsetTuner.fail_next = False
    assert len(model.ledger) == 2
    torch.testing.assert_close(logits(model, tokenizer), expected, atol=0, rtol=0)


def test_unload_is_bit_identical(edited):
    model, tokenizer, before, original = edited
    base = model.unload_edits()
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(logits(base, tokenizer), original, atol=0, rtol=0)
