"""A weight delta on one projection, grown one edit at a time: low-rank factors, or dense when smaller.

For each adapter the layer holds factors ``delta_A`` (r x in) and ``delta_B`` (out x r) such that
the edited projection computes ``W x + B (A x)``. Every edit appends its own rows/columns, so the
ledger can say which slice of the rank belongs to which edit, and the total rank is known from
the ledger before weights are loaded.

Once the total rank r reaches ``in * out / (in + out)`` the factors would take more room than the
matrix itself (a MEMIT batch of thousands of requests), so the layer switches to one dense delta
``delta_dense`` (out x in) and adds later edits into it. The switch depends on the rank alone, so
a loaded adapter is rebuilt in the same form the saved one had.

The maths is kept in the (out, in) layout of ``nn.Linear``; GPT-2's ``Conv1D`` stores its weight
transposed, which only matters when the delta is written into the weight (merge) or exported.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...architectures import in_out_features


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class DeltaLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("delta_A", "delta_B", "delta_dense")
    other_param_names = ("_rank",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, rank: int) -> None:
        super().__init__()
        BaseTunerLayer.__init__(self)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.is_conv1d = isinstance(base_layer, Conv1D)
        self.delta_A = nn.ParameterDict({})
        self.delta_B = nn.ParameterDict({})
        self.delta_dense = nn.ParameterDict({})
        # Rank the edits add up to, per adapter; in dense form the shapes no longer tell it.
        self._rank: dict[str, int] = {}
        # The exact pre-merge weight, so that unmerging restores it bit for bit (subtracting the
        # delta again would leave rounding noise behind).
        self._weight_before_merge: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, rank)

    # ----------------------------------------------------------------- state
    @property
    def dense_from_rank(self) -> int:
        """The rank from which a dense matrix is smaller than the factors."""
        return -(-self.in_features * self.out_features // (self.in_features + self.out_features))

    def update_layer(self, adapter_name: str, rank: int) -> None:
        weight = self.get_base_layer().weight
        factory = {
            "device": weight.device,
            "dtype": torch.float32 if not weight.is_floating_point() else weight.dtype,
        }
        dense = rank >= self.dense_from_rank
        factor_rank = 0 if dense else rank
        self.delta_A[adapter_name] = _frozen(torch.zeros(factor_rank, self.in_features, **factory))
        self.delta_B[adapter_name] = _frozen(torch.zeros(self.out_features, factor_rank, **factory))
        if dense:
            self.delta_dense[adapter_name] = _frozen(torch.zeros(self.out_features, self.in_features, **factory))
        self._rank[adapter_name] = rank
        self.set_adapter(self.active_adapters)

    def rank(self, adapter_name: str) -> int:
        return self._rank[adapter_name]

    def is_dense(self, adapter_name: str) -> bool:
        return adapter_name in self.delta_dense

    def delta_out_in(self, adapter_name: str) -> torch.Tensor:
        """The whole delta, (out, in)."""
        if self.is_dense(adapter_name):
            return self.delta_dense[adapter_name]
        return self.delta_B[adapter_name] @ self.delta_A[adapter_name]

    @torch.no_grad()
    def append(self, adapter_name: str, A: torch.Tensor, B: torch.Tensor | None = None) -> tuple[int, int]:
        """Add one edit's delta and return the slice of the rank it occupies.

        ``append(name, A, B)`` adds the low-rank delta ``B @ A``; ``append(name, D)`` adds a dense
        (out, in) delta ``D``, which counts as rank ``dense_from_rank`` and turns the layer dense.
        """
        if B is None:
            D = A
            if D.shape != (self.out_features, self.in_features):
                raise ValueError(
                    f"A dense edit delta of shape {tuple(D.shape)} does not fit a "
                    f"{self.out_features}x{self.in_features} projection."
                )
            added_rank = self.dense_from_rank
        else:
            if A.shape[1] != self.in_features or B.shape[0] != self.out_features or A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"Edit factors of shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a "
                    f"{self.out_features}x{self.in_features} projection."
                )
            added_rank = A.shape[0]
        old_A, old_B = self.delta_A[adapter_name], self.delta_B[adapter_name]
        D = A.to(old_A) if B is None else B.to(old_B) @ A.to(old_A)
        start = self._rank[adapter_name]
        stop = start + added_rank
        if self.is_dense(adapter_name):
            self.delta_dense[adapter_name] = _frozen(self.delta_dense[adapter_name] + D)
        elif stop >= self.dense_from_rank:
            self.delta_dense[adapter_name] = _frozen(old_B @ old_A + D)
            self.delta_A[adapter_name] = _frozen(old_A[:0].clone())
            self.delta_B[adapter_name] = _frozen(old_B[:, :0].clone())
        else:
            self.delta_A[adapter_name] = _frozen(torch.cat([old_A, A.to(old_A)], dim=0))
            self.delta_B[adapter_name] = _frozen(torch.cat([old_B, B.to(old_B)], dim=1))
        self._rank[adapter_name] = stop
        if adapter_name in self.merged_adapters:
            base = self.get_base_layer()
            base.weight.data += self._to_weight_layout(D).to(base.weight.dtype)
        return start, stop

    @torch.no_grad()
    def zero_components(self, adapter_name: str, start: int, stop: int) -> None:
        """Remove rank components ``start:stop`` (factor form only; the rank and ledger slices stay)."""
        if self.is_dense(adapter_name):
            raise ValueError("A dense delta has no separate components to remove.")
        B = self.delta_B[adapter_name]
        removed = B[:, start:stop] @ self.delta_A[adapter_name][start:stop]
        kept = B.clone()  # a new tensor: snapshots taken before must stay valid
        kept[:, start:stop] = 0
        self.delta_B[adapter_name] = _frozen(kept)
        if adapter_name in self.merged_adapters:
            base = self.get_base_layer()
            base.weight.data -= self._to_weight_layout(removed).to(base.weight.dtype)

    def snapshot(self, adapter_name: str):
        """What :meth:`restore` needs to undo every later ``append`` (appends never modify in place)."""
        return (
            self.delta_A[adapter_name],
            self.delta_B[adapter_name],
            self.delta_dense[adapter_name] if self.is_dense(adapter_name) else None,
            self._rank[adapter_name],
        )

    @torch.no_grad()
    def restore(self, adapter_name: str, snapshot) -> None:
        A, B, dense, rank = snapshot
        self.delta_A[adapter_name], self.delta_B[adapter_name] = A, B
        if dense is None:
            if self.is_dense(adapter_name):
                del self.delta_dense[adapter_name]
        else:
            self.delta_dense[adapter_name] = dense
        self._rank[adapter_name] = rank
        if adapter_name in self.merged_adapters:
            base = self.get_base_layer()
            # Applied in one step (not edit by edit) so the merged weight matches a fresh merge.
            delta = self._to_weight_layout(self.delta_out_in(adapter_name))
            base.weight.data = self._weight_before_merge + delta.to(base.weight.dtype)

    def _to_weight_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        return delta_out_in.T if self.is_conv1d else delta_out_in

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's delta in the storage layout of the base weight."""
        return self._to_weight_layout(self.delta_out_in(adapter_name))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    # ---------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.delta_A:
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            merged = base.weight.data + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"Merging edit adapter {name!r} would put non-finite values into the weights."
                )
            if self._weight_before_merge is None:
                self._weight_before_merge = base.weight.data.clone()
            base.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.get_base_layer().weight.data = self._weight_before_merge
        self._weight_before_merge = None
        self.merged_adapters = []

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self._rank or self._rank[name] == 0:
                continue
            if self.is_dense(name):
                D = self.delta_dense[name]
                result = result + (x.to(D.dtype) @ D.T).to(result.dtype)
            else:
                A, B = self.delta_A[name], self.delta_B[name]
                result = result + ((x.to(A.dtype) @ A.T) @ B.T).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "delta." + super().__repr__()
