"""Fingerprints of base weights, so an adapter is never applied to weights it was not computed for.

An edit is a delta computed against particular weights; added to different weights (another
checkpoint, a fine-tuned variant) it silently does something else. Each adapter records a
fingerprint of every module it targets, and loading checks them before anything is changed.

The fingerprint hashes the weight rounded to bfloat16, so the same checkpoint loaded in float32 or
bfloat16 matches, while any real change of the weights does not.
"""

from __future__ import annotations

import hashlib

import torch


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A short, dtype-robust hash of a weight tensor (its shape included)."""
    data = weight.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest = hashlib.sha256()
    digest.update(str(tuple(data.shape)).encode())
    digest.update(data.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


class BaseWeightsMismatchError(ValueError):
    """An adapter is being applied to weights other than those it was computed for."""
