"""Check, rather than assume, that a model is back to its original weights after edits are unloaded.

The check is exact: each parameter's bytes are hashed (SHA-256) before editing and compared after
``unload_edits()``, so a restore that is off by one bit in one weight is caught.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class RestoreError(RuntimeError):
    """A model's weights differ from what they were before editing, after the edits were unloaded."""


def exact_hash(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()  # hashes the buffer in place, no copy


class WeightSnapshot:
    """Exact hashes of every parameter of a model, taken once before editing."""

    def __init__(self, model: nn.Module) -> None:
        self.hashes = {name: exact_hash(p) for name, p in model.named_parameters()}

    def verify(self, model: nn.Module, modules: Iterable[str] | None = None) -> None:
        """Raise :class:`RestoreError` unless ``model`` (or just ``modules`` and their children) is as snapshotted."""
        leftovers = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        if leftovers:
            raise RestoreError(f"Edit layers are still in the model after unloading: {leftovers[:5]}.")
        modules = None if modules is None else list(modules)
        prefixes = None if modules is None else tuple(f"{m}." for m in modules)
        current = dict(model.named_parameters())
        checked = [n for n in self.hashes if prefixes is None or n.startswith(prefixes)]
        if prefixes is not None and not checked:
            raise RestoreError(f"None of the edited modules {sorted(modules)} has parameters to check.")
        missing = [n for n in checked if n not in current]
        changed = [n for n in checked if n in current and exact_hash(current[n]) != self.hashes[n]]
        if missing or changed:
            raise RestoreError(
                "The model's weights were not restored exactly after unloading the edits: "
                f"changed {changed[:5]}, missing {missing[:5]}."
            )
