"""T-Patcher's maths: where a new patch starts, and its activation and memory losses.

A patch's pre-activation on a key ``q`` is ``s(q) = k·q + b``. The paper's losses, written as
hinges with unit margins: the activation loss wants ``s ≥ 1`` wherever the edit's target is
predicted, the memory loss ``s ≤ -1`` on every memory key (unrelated text, earlier edits).
A patch adds its value only above a firing threshold ``θ`` in these units (see
:func:`patch_activation`), and is stored as the plain ReLU neuron that computes the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PatchStart:
    direction: torch.Tensor  # (in,): k = scale * direction
    scale: float
    bias: float


def key_direction(
    edit_keys: torch.Tensor, memory_keys: torch.Tensor, second_moment: torch.Tensor, ridge: float
) -> torch.Tensor:
    """The unit direction ``(C + ridge·mean(diag C)·I)⁻¹ (mean edit key − mean memory key)``.

    Un-whitened, the difference of means points along what every late-layer key of a question
    shares (a patch along it fires on any question); whitening by the keys' second moment ``C``
    discounts the directions ordinary text already varies along, as ROME's ``C⁻¹k`` does, leaving
    what is particular to the edit.
    """
    return key_directions([edit_keys], memory_keys, second_moment, ridge)[0]


def key_directions(
    edit_key_sets: Sequence[torch.Tensor], memory_keys: torch.Tensor, second_moment: torch.Tensor, ridge: float
) -> torch.Tensor:
    """:func:`key_direction` of each set of edit keys, (sets, in): one solve for all of them."""
    moment = second_moment.to(memory_keys)
    regularized = moment + ridge * moment.diagonal().mean() * torch.eye(
        moment.shape[0], dtype=moment.dtype, device=moment.device
    )
    differences = torch.stack([keys.mean(0) for keys in edit_key_sets]) - memory_keys.mean(0)
    directions = torch.linalg.solve(regularized, differences.T).T
    return directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def initial_patch(
    edit_keys: torch.Tensor, memory_keys: torch.Tensor, direction: torch.Tensor, boundary: float = 0.5
) -> PatchStart:
    """A key along ``direction``, firing from ``boundary`` of the way from the memory to the edit.

    With the boundary halfway the edit sits at s = +1 and the memory at -1; further towards the
    edit, the memory sits lower and unseen text must come closer to the edit to fire the patch.

    Measured on the closest cases (the edit key least along the direction, the memory key most),
    so a patch that starts separable needs no key training at all; otherwise the losses take over.
    """
    edit_low = (edit_keys @ direction).min()
    memory_high = (memory_keys @ direction).max()
    gap = edit_low - memory_high
    if gap <= 0:  # not separable along this direction: centre between the means instead
        edit_low, memory_high = (edit_keys @ direction).mean(), (memory_keys @ direction).mean()
        gap = (edit_low - memory_high).clamp(min=1e-6)
    # s = scale * (q·direction - threshold), threshold `boundary` of the way from memory to edit, s(edit_low) = 1.
    threshold = memory_high + boundary * gap
    scale = float(1.0 / ((1.0 - boundary) * gap))
    bias = float(-scale * threshold)
    return PatchStart(direction=direction, scale=scale, bias=bias)


def activation_loss(edit_pre: torch.Tensor) -> torch.Tensor:
    return torch.relu(1.0 - edit_pre).mean()


def memory_loss(memory_pre: torch.Tensor) -> torch.Tensor:
    return torch.relu(memory_pre + 1.0).mean()


def patch_activation(pre: torch.Tensor, threshold: float) -> torch.Tensor:
    """``relu(s − θ) / (1 − θ)``: nothing below ``θ``, and 1 where the edit's margin puts it (s = 1).

    Unseen text crosses a patch's hyperplane now and then, mostly just above it (on SmolLM2,
    after 100 zsRE edits, half of such stray pre-activations are below 0.44), while the edit sits
    at 1 or above; with hundreds of patches those small pushes add up to wrong answers.
    """
    return torch.relu(pre - threshold) / (1.0 - threshold)


def as_plain_neurons(keys: torch.Tensor, bias: torch.Tensor, threshold: float):
    """Keys and biases of ``relu(k'·q + b')`` equal to :func:`patch_activation` of ``k·q + b``."""
    scale = 1.0 / (1.0 - threshold)
    return (keys * scale).detach(), ((bias - threshold) * scale).detach()
