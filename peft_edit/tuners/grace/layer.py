"""GRACE's codebook: keys, values and deferral radii beside one wrapped module.

For each adapter the layer holds ``grace_keys`` (n x in), ``grace_values`` (n x out),
``grace_radii`` (n) and ``grace_labels`` (n, a hash of each entry's target text). At every
position, the input is compared with the keys (Euclidean distance); where the nearest key is
within its radius, the module's output there is replaced by that key's value. Every other
position passes through unchanged, so prompts far from all edits behave exactly as before.

The codebook rules (Hartvigsen et al., 2023) live in :meth:`GraceLayer.placement`: a new key far
from every stored one is added; one that falls near a stored key (closer than the sum of their
radii) with the same target widens that key's radius to cover it, and with a different target
splits the space, both radii shrinking to half their distance. A key at the very position of a
stored one (the same prompt edited again) overwrites that entry. An expanded entry's new key is
stored as well, carrying the shared value, so that later splits cannot take its prompt away.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...architectures import in_out_features
from ..wrapped import WrappedLayer


def target_label(target: str) -> int:
    """A stable 63-bit hash of a target text: entries with equal labels give the same answer."""
    return int.from_bytes(hashlib.sha256(target.strip().encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Placement:
    """Where a new key goes: ``add`` a new entry, ``expand`` / ``split`` / ``replace`` entry ``index``.

    ``distance`` is the new key's distance to that entry's key; ``margin`` how far past it an
    expanded radius reaches, so the new key is covered despite rounding differences between the
    forward pass that measured it and later ones.
    """

    action: str
    index: int | None = None
    distance: float | None = None
    margin: float = 0.0


def clear_radii(keys: torch.Tensor, bystanders: Sequence[torch.Tensor], tolerance: float) -> torch.Tensor:
    """For each of ``keys`` (n, in), the largest radius that stays clear of every bystander key:
    half the distance to the nearest (as a split leaves half the way to a key that answers
    differently); infinite when there are none.

    A bystander within ``tolerance`` (a fraction of the key's norm, as ``replace_tolerance``) is
    the key's own context, not a neighbour: an edit whose prompt begins another edited row (a
    passage corrected sentence by sentence) answers there too, as it would with no radius at all.
    """
    keys = keys.float()
    radii = torch.full((keys.shape[0],), float("inf"), device=keys.device)
    for block in bystanders:  # blocks are views into each row's keys: joining them would copy them all
        if len(block):
            distances = torch.cdist(keys, block.float().to(keys.device))
            radii = torch.minimum(radii, half_clear_distance(distances, keys, tolerance))
    return radii


def half_clear_distance(distances: torch.Tensor, keys: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(n,) from the distances (n, m) of ``keys`` (n, in) to m > 0 bystanders: half the distance to the
    nearest that is not the key's own context (see :func:`clear_radii`)."""
    own_context = same_context(distances, keys, tolerance)
    return distances.masked_fill(own_context, float("inf")).min(dim=-1).values / 2


def same_context(distances: torch.Tensor, keys: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(n, m) bool, from the distances (n, m) of ``keys`` (n, in) to m bystanders: bystander j lies
    within ``tolerance`` (a fraction of the key's norm) of key i, i.e. it is the same text as that
    key's prompt, up to rounding."""
    return distances <= tolerance * keys.norm(dim=-1, keepdim=True)


def clear_radius(key: torch.Tensor, bystanders: Sequence[torch.Tensor], tolerance: float) -> float:
    return float(clear_radii(key[None], bystanders, tolerance)[0])


class GraceLayer(WrappedLayer):
    adapter_layer_names = ("grace_keys", "grace_values", "grace_radii")
    other_param_names = ("grace_labels",)
    method_title = "GRACE"
    storage = "a codebook"

    # ----------------------------------------------------------------- state
    def create_adapter_state(self, adapter_name: str, size: int) -> None:
        if not hasattr(self, "grace_keys"):
            self.grace_keys = nn.ParameterDict({})
            self.grace_values = nn.ParameterDict({})
            self.grace_radii = nn.ParameterDict({})
            self.grace_labels = BufferDict({}, persistent=True)
        device = self.state_factory()["device"]
        # The codebook stays float32 whatever the model's dtype: distances near zero need the precision.
        d_in, d_out = self._io_sizes()
        new = {"device": device, "dtype": torch.float32}
        self.grace_keys[adapter_name] = nn.Parameter(torch.zeros(size, d_in, **new), requires_grad=False)
        self.grace_values[adapter_name] = nn.Parameter(torch.zeros(size, d_out, **new), requires_grad=False)
        self.grace_radii[adapter_name] = nn.Parameter(torch.zeros(size, **new), requires_grad=False)
        self.grace_labels[adapter_name] = torch.zeros(size, dtype=torch.long, device=device)

    def _io_sizes(self) -> tuple[int, int]:
        """Input and output widths of the wrapped module (an MLP, or a bare projection)."""
        base = self.get_base_layer()
        projections = [m for m in base.modules() if isinstance(m, (nn.Linear, Conv1D))]
        if not projections:
            raise TypeError(
                f"GRACE wraps an MLP or a projection; {type(base).__name__} has no linear layers."
            )
        d_in, _ = in_out_features(projections[0])
        _, d_out = in_out_features(projections[-1])
        return d_in, d_out

    def size(self, adapter_name: str) -> int:
        return self.grace_keys[adapter_name].shape[0]

    def entry(self, adapter_name: str, index: int) -> dict:
        return {
            "key": self.grace_keys[adapter_name][index],
            "value": self.grace_values[adapter_name][index],
            "radius": float(self.grace_radii[adapter_name][index]),
            "label": int(self.grace_labels[adapter_name][index]),
        }

    # ---------------------------------------------------------------- lookup
    def nearest(self, adapter_name: str, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of the nearest key for each row of ``queries`` (rows x in)."""
        keys = self.grace_keys[adapter_name]
        distances = torch.cdist(queries.float(), keys)
        return distances.min(dim=-1)

    def apply(self, adapter_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"GRACE needs the wrapped module to return a tensor, got {type(output).__name__}; set "
                "GraceConfig.target_modules to an MLP or projection inside a block."
            )
        queries = x.reshape(-1, x.shape[-1])
        distance, index = self.nearest(adapter_name, queries)
        hit = distance <= self.grace_radii[adapter_name][index]
        if not hit.any():
            return output
        flat = output.reshape(-1, output.shape[-1]).clone()
        flat[hit] = self.grace_values[adapter_name][index[hit]].to(flat.dtype)
        return flat.view_as(output)

    # ----------------------------------------------------------------- edits
    def placement(
        self, adapter_name: str, key: torch.Tensor, label: int, radius: float, tolerance: float
    ) -> Placement:
        """GRACE's rule for a new key (see the module docstring); ``tolerance`` is absolute."""
        if self.size(adapter_name) == 0:
            return Placement("add")
        distance, index = self.nearest(adapter_name, key[None])
        d, i = float(distance[0]), int(index[0])
        if d <= tolerance:
            return Placement("replace", i, d)
        if d > float(self.grace_radii[adapter_name][i]) + radius:
            return Placement("add", None, d)
        same_target = int(self.grace_labels[adapter_name][i]) == label
        return Placement("expand" if same_target else "split", i, d, margin=tolerance)

    @torch.no_grad()
    def append(
        self,
        adapter_name: str,
        placement: Placement,
        key: torch.Tensor,
        value: torch.Tensor,
        radius: float,
        label: int,
        bystanders: Sequence[torch.Tensor] = (),
        tolerance: float = 0.0,
    ) -> tuple[int, int]:
        """Carry out ``placement``, then :meth:`keep_clear_of` the edit's ``bystanders``; return the
        entry that now answers this edit, as a slice [i, i + 1)."""
        answering = self._place(adapter_name, placement, key, value, radius, label)
        self.keep_clear_of(adapter_name, bystanders, tolerance)
        return answering

    @torch.no_grad()
    def keep_clear_of(self, adapter_name: str, bystanders: Sequence[torch.Tensor], tolerance: float) -> None:
        """Shrink every radius to :func:`clear_radius` of the bystander keys.

        Bystanders are the positions of an edited row other than its own: its prompt's earlier
        tokens and its target's. Its value was optimised with them passing through; an entry that
        reached one would change the context the value was made for. A long prompt's earlier
        sentence ends, for instance, sit as close to its last token as paraphrases do (SmolLM2,
        hallucination corrections: 19 of 22 teacher-forced misses after 60 edits came from an
        entry, the edit's own or another's, replacing an earlier prompt position).
        """
        radii = self.grace_radii[adapter_name]
        if radii.shape[0]:
            clear = clear_radii(self.grace_keys[adapter_name], bystanders, tolerance)
            radii.copy_(torch.minimum(radii, clear.to(radii)))

    def _place(self, adapter_name: str, placement: Placement, key, value, radius: float, label: int):
        keys, values = self.grace_keys[adapter_name], self.grace_values[adapter_name]
        radii, labels = self.grace_radii[adapter_name], self.grace_labels[adapter_name]
        if key.shape[-1] != keys.shape[1] or value.shape[-1] != values.shape[1]:
            raise ValueError(
                f"A GRACE entry of key size {key.shape[-1]} and value size {value.shape[-1]} does not fit a "
                f"codebook of {keys.shape[1]} -> {values.shape[1]}."
            )
        key, value = key.to(keys), value.to(values)
        i = placement.index
        if placement.action == "expand":
            # Coverage: the stored key's ball grows to reach the new key; the value is shared (and was
            # re-optimised for both prompts). The new key is stored too, with that value: a later
            # split around the stored key halves its radius and can leave the new prompt outside it,
            # or put a nearer key beside it, while a prompt's own key is always its nearest.
            radii[i] = max(float(radii[i]), placement.distance + placement.margin)
            values[i] = value
        if placement.action == "replace":
            values[i], labels[i] = value, label
            return i, i + 1
        if placement.action == "split":
            # The two keys answer differently: each keeps the half of the space nearer to it.
            half = placement.distance / 2
            radii[i] = min(float(radii[i]), half)
            radius = min(radius, half)
        n = keys.shape[0]
        self.grace_keys[adapter_name] = nn.Parameter(torch.cat([keys, key[None]]), requires_grad=False)
        self.grace_values[adapter_name] = nn.Parameter(torch.cat([values, value[None]]), requires_grad=False)
        self.grace_radii[adapter_name] = nn.Parameter(
            torch.cat([radii, radii.new_tensor([radius])]), requires_grad=False
        )
        self.grace_labels[adapter_name] = torch.cat([labels, labels.new_tensor([label])])
        return n, n + 1
