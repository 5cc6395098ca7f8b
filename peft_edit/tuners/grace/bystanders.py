"""Every edited row's bystander keys in one matrix, so that a key's distance to all of them is one product.

Each GRACE edit compares its key with the bystanders of every earlier edit (the codebook module's
inputs at each position of an edited row but the row's own): for the radius that stays clear of
them, and for the earlier rows the new entry now answers in. Over hundreds of long rows that is
tens of thousands of keys (SmolLM2, after 260 hallucination corrections: comparing them block by
block took ~120 ms per edit, copying them into one tensor at every edit and comparing that about
twice as long). The bank keeps them concatenated with their squared norms, in ledger order, and
grows in place as edits arrive.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from .layer import half_clear_distance, same_context


class BystanderBank:
    """Bystander keys of a sequence of labelled blocks (one per edited row), each block's rows tagged
    with its ``owner`` (the ledger entry it belongs to).

    :meth:`sync` brings the bank to a new list of blocks: when the bank's blocks begin that list (the
    usual case: an edit was appended) only the new ones are copied in; otherwise (a rollback, a
    retired request) it is rebuilt.
    """

    def __init__(self) -> None:
        self._labels: list[Hashable] = []
        self._keys: torch.Tensor | None = None  # (capacity, in), the first `size` rows in use
        self._squared_norms: torch.Tensor | None = None
        self._owners: torch.Tensor | None = None
        self.size = 0

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[: self.size] if self._keys is not None else torch.empty(0)

    @property
    def owners(self) -> torch.Tensor:
        """(size,) the owner of each key."""
        return self._owners[: self.size] if self._owners is not None else torch.empty(0, dtype=torch.long)

    def sync(self, blocks: Sequence[tuple[Hashable, int, torch.Tensor]]) -> None:
        """Hold exactly ``blocks``: (label, owner, keys (n, in)) in order; equal labels mean equal keys."""
        labels = [label for label, _, _ in blocks]
        if labels[: len(self._labels)] != self._labels:
            self._labels, self._keys, self._squared_norms, self._owners, self.size = [], None, None, None, 0
        new = blocks[len(self._labels) :]
        if new:
            self._append(
                torch.cat([keys.float() for _, _, keys in new]),
                torch.cat([torch.full((len(keys),), owner, dtype=torch.long) for _, owner, keys in new]),
            )
            self._labels = labels

    def distances(self, key: torch.Tensor) -> torch.Tensor:
        """(size,) Euclidean distance from ``key`` (in,) to every key in the bank, from the squared norms
        and one product (as :func:`torch.cdist` computes distances to many keys)."""
        if self.size == 0:
            return torch.empty(0)
        key = key.float().to(self._keys.device)
        squared = self._squared_norms[: self.size] - 2 * (self.keys @ key) + key.dot(key)
        return squared.clamp_min(0).sqrt()

    def clear_distance(self, key: torch.Tensor, tolerance: float) -> float:
        """Half the distance from ``key`` to the nearest bank key that is not its own context (see
        :func:`~peft_edit.tuners.grace.layer.clear_radii`); infinite for an empty bank."""
        if self.size == 0:
            return float("inf")
        return float(half_clear_distance(self.distances(key)[None], key[None], tolerance)[0])

    def in_context(self, key: torch.Tensor, tolerance: float) -> torch.Tensor:
        """(size,) bool: the bank keys that are ``key``'s own text, up to rounding (``tolerance`` is a
        fraction of its norm)."""
        return same_context(self.distances(key)[None], key[None], tolerance)[0]

    def _append(self, keys: torch.Tensor, owners: torch.Tensor) -> None:
        needed = self.size + len(keys)
        if self._keys is None or needed > len(self._keys):
            # Capacity doubles, so that appending one edit at a time copies each key O(1) times.
            capacity = max(needed, 2 * (len(self._keys) if self._keys is not None else 0), 1024)
            grown = keys.new_empty(capacity, keys.shape[1])
            grown_norms = keys.new_empty(capacity)
            grown_owners = owners.new_empty(capacity)
            if self.size:
                grown[: self.size] = self._keys[: self.size]
                grown_norms[: self.size] = self._squared_norms[: self.size]
                grown_owners[: self.size] = self._owners[: self.size]
            self._keys, self._squared_norms, self._owners = grown, grown_norms, grown_owners
        self._keys[self.size : needed] = keys
        self._squared_norms[self.size : needed] = keys.pow(2).sum(dim=-1)
        self._owners[self.size : needed] = owners
        self.size = needed
