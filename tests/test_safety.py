"""Bad input fails clearly and leaves nothing half-done: the model, the adapter, the saved folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel
from tiny_models import tiny_model, tiny_model_and_tokenizer
from torch import nn

import peft_edit
from peft_edit import (
    BaseWeightsMismatchError,
    EditRequest,
    RomeConfig,
    UnsupportedModelError,
    get_edited_model,
    load_edited_model,
)

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
FAST = dict(
    stats_corpus="identity", v_num_steps=3, context_template_lengths=[3], context_templates_per_length=1
)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert not any("delta" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(
        model, RomeConfig(**FAST), requests=[REQUEST], tokenizer=tokenizer, progress=False
    )
    folder = tmp_path_factory.mktemp("adapter") / "edit"
    edited.save_pretrained(folder)
    return folder, tokenizer


def test_a_layer_beyond_the_model_fails_before_touching_it():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="only 4 blocks"):
        get_edited_model(model, RomeConfig(layer=9, **FAST), requests=[REQUEST], tokenizer=tokenizer)
    assert_untouched(model, before)


def test_a_bad_request_fails_before_touching_the_model():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        get_edited_model(
            model,
            RomeConfig(**FAST),
            requests=[{"prompt": "Where is it?", "subject": "The Eiffel Tower", "target_new": "Rome"}],
            tokenizer=tokenizer,
        )
    with pytest.raises(ValueError, match="tokenizer"):
        get_edited_model(model, RomeConfig(**FAST), requests=[REQUEST])
    with pytest.raises(TypeError, match="edit config"):
        get_edited_model(model, {"method": "rome"}, requests=[REQUEST], tokenizer=tokenizer)
    assert_untouched(model, before)


def test_an_unsupported_model_names_the_config_field_to_set():
    class Odd(nn.Module):  # no block list, no config
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="layers_path"):
        get_edited_model(Odd(), RomeConfig(**FAST))


def test_a_failing_edit_leaves_the_model_as_it_was(monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    before = snapshot(model)

    def explode(*args, **kwargs):
        raise RuntimeError("optimisation failed")

    monkeypatch.setattr(peft_edit.tuners.rome.model, "compute_key_and_delta", explode)
    with pytest.raises(RuntimeError, match="optimisation failed"):
        get_edited_model(model, RomeConfig(**FAST), requests=[REQUEST], tokenizer=tokenizer, progress=False)
    assert_untouched(model, before)


def test_a_failing_edit_call_rolls_the_adapter_back(monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(
        model, RomeConfig(**FAST), requests=[REQUEST], tokenizer=tokenizer, progress=False
    )
    ledger, weights = edited.ledger, snapshot(edited)
    real = peft_edit.tuners.rome.model.compute_key_and_delta
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second request failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_edit.tuners.rome.model, "compute_key_and_delta", fail_on_second)
    second = EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Paris")
    third = EditRequest(prompt="{} is located in the city of", subject="The Colosseum", target_new="London")
    with pytest.raises(RuntimeError, match="second request failed"):
        edited.edit([second, third], progress=False)
    assert len(calls) == 2  # the first new edit was stored, then rolled back
    assert edited.ledger == ledger
    after = edited.state_dict()
    assert set(after) == set(weights) and all(torch.equal(after[k], v) for k, v in weights.items())


def test_loading_onto_other_weights_is_refused_unless_overridden(saved_adapter):
    folder, tokenizer = saved_adapter
    other = tiny_model("llama", seed=1)
    before = snapshot(other)
    with pytest.raises(BaseWeightsMismatchError, match="verify_base_weights=False"):
        PeftModel.from_pretrained(other, folder)
    assert_untouched(other, before)
    loaded = load_edited_model(other, folder, verify_base_weights=False)
    assert loaded.ledger[0]["requests"][0]["subject"] == "The Eiffel Tower"


def test_the_same_weights_in_bfloat16_are_accepted(saved_adapter):
    folder, _ = saved_adapter
    loaded = PeftModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), folder)
    assert len(loaded.ledger) == 1


def test_an_interrupted_save_leaves_the_previous_adapter(saved_adapter, tmp_path, monkeypatch):
    folder, tokenizer = saved_adapter
    loaded = load_edited_model(tiny_model("llama"), folder)
    target = tmp_path / "out"
    loaded.save_pretrained(target)
    original = {p.name: p.read_bytes() for p in target.iterdir()}

    import peft.utils.save_and_load as save_and_load

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(save_and_load, "get_peft_model_state_dict", interrupted)
    import peft.peft_model

    monkeypatch.setattr(peft.peft_model, "get_peft_model_state_dict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loaded.save_pretrained(target)
    with pytest.raises(KeyboardInterrupt):
        loaded.save_pretrained(tmp_path / "new")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == original
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_a_saved_adapter_is_readable_as_a_plain_folder_and_files_would_be(saved_adapter, tmp_path):
    """Written into a staging folder first, the saved folder and every file in it (the weights too, which
    safetensors writes owner-only) still get the umask's permissions."""
    folder, _ = saved_adapter
    load_edited_model(tiny_model("llama"), folder).save_pretrained(tmp_path / "out")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").touch()
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode
    files = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    plain_file_mode = (tmp_path / "plain.txt").stat().st_mode
    assert {p.name: p.stat().st_mode for p in files} == {p.name: plain_file_mode for p in files}


def test_the_ledger_is_in_the_saved_config(saved_adapter):
    folder, _ = saved_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["edits"][0]["requests"] == [REQUEST.to_dict()]
    assert config["target_modules"] == ["model.layers.1.mlp.down_proj"]
    assert set(config["base_fingerprints"]) == {"model.layers.1.mlp.down_proj"}


def test_importing_twice_registers_once():
    code = textwrap.dedent(
        """
        import importlib, peft_edit
        from peft.utils import PeftType
        importlib.reload(peft_edit)
        assert [m for m in PeftType.__members__ if m == "ROME"] == ["ROME"]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]


def test_safe_merge_refuses_non_finite_weights(saved_adapter):
    folder, _ = saved_adapter
    loaded = load_edited_model(tiny_model("llama"), folder)
    layer = loaded.get_base_model().get_submodule("model.layers.1.mlp.down_proj")
    before = layer.get_base_layer().weight.detach().clone()
    layer.delta_B["default"].data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        loaded.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)


def test_cli_info_lists_the_edits(saved_adapter, capsys):
    from peft_edit.cli import main

    folder, _ = saved_adapter
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "method:         rome" in out
    assert "The Eiffel Tower is located in the city of -> 'Rome'" in out
    assert main(["info", str(folder.parent / "missing")]) == 2


def test_editing_a_model_that_already_holds_edits_asks_for_edit_or_unload():
    model, tokenizer = tiny_model_and_tokenizer("llama")
    edited = get_edited_model(model, RomeConfig(**FAST), requests=[REQUEST], tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match=r"\.edit\(requests\)"):
        get_edited_model(edited.base_model.model, RomeConfig(**FAST), requests=[REQUEST], tokenizer=tokenizer)
    assert len(edited.ledger) == 1
