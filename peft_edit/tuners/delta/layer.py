"""A low-rank weight delta on one projection, grown one edit at a time.

For each adapter the layer holds factors ``delta_A`` (r x in) and ``delta_B`` (out x r) such that
the edited projection computes ``W x + B (A x)``. Every edit appends its own rows/columns, so the
ledger can say which slice of the rank belongs to which edit, and the total rank is known from
the ledger before weights are loaded.

The maths is kept in the (out, in) layout of ``nn.Linear``; GPT-2's ``Conv1D`` stores its weight
transposed, which only matters when the delta is written into the weight (merge) or exported.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...architectures import in_out_features


class DeltaLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("delta_A", "delta_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, rank: int) -> None:
        super().__init__()
        BaseTunerLayer.__init__(self)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.is_conv1d = isinstance(base_layer, Conv1D)
        self.delta_A = nn.ParameterDict({})
        self.delta_B = nn.ParameterDict({})
        # The exact pre-merge weight, so that unmerging restores it bit for bit (subtracting the
        # delta again would leave rounding noise behind).
        self._weight_before_merge: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, rank)

    # ----------------------------------------------------------------- state
    def update_layer(self, adapter_name: str, rank: int) -> None:
        weight = self.get_base_layer().weight
        factory = {
            "device": weight.device,
            "dtype": torch.float32 if not weight.is_floating_point() else weight.dtype,
        }
        self.delta_A[adapter_name] = nn.Parameter(
            torch.zeros(rank, self.in_features, **factory), requires_grad=False
        )
        self.delta_B[adapter_name] = nn.Parameter(
            torch.zeros(self.out_features, rank, **factory), requires_grad=False
        )
        self.set_adapter(self.active_adapters)

    def rank(self, adapter_name: str) -> int:
        return self.delta_A[adapter_name].shape[0]

    @torch.no_grad()
    def append(self, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> tuple[int, int]:
        """Add the factors of one edit; return the slice of the rank they occupy."""
        old_A, old_B = self.delta_A[adapter_name], self.delta_B[adapter_name]
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"Edit factors of shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a "
                f"{self.out_features}x{self.in_features} projection."
            )
        A = A.to(old_A)
        B = B.to(old_B)
        start = old_A.shape[0]
        self.delta_A[adapter_name] = nn.Parameter(torch.cat([old_A, A], dim=0), requires_grad=False)
        self.delta_B[adapter_name] = nn.Parameter(torch.cat([old_B, B], dim=1), requires_grad=False)
        if adapter_name in self.merged_adapters:
            base = self.get_base_layer()
            base.weight.data += self._to_weight_layout(B @ A).to(base.weight.dtype)
        return start, start + A.shape[0]

    def snapshot(self, adapter_name: str):
        """What :meth:`restore` needs to undo every later ``append`` (appends never modify in place)."""
        return self.delta_A[adapter_name], self.delta_B[adapter_name]

    @torch.no_grad()
    def restore(self, adapter_name: str, snapshot) -> None:
        A, B = snapshot
        if adapter_name in self.merged_adapters:
            base = self.get_base_layer()
            # Applied in one step (not edit by edit) so the merged weight matches a fresh merge of A, B.
            base.weight.data = self._weight_before_merge + self._to_weight_layout(B @ A).to(base.weight.dtype)
        self.delta_A[adapter_name], self.delta_B[adapter_name] = A, B

    def _to_weight_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        return delta_out_in.T if self.is_conv1d else delta_out_in

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's delta in the storage layout of the base weight."""
        A, B = self.delta_A[adapter_name], self.delta_B[adapter_name]
        return self._to_weight_layout(B @ A)

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
            if name not in self.delta_A or self.delta_A[name].shape[0] == 0:
                continue
            A, B = self.delta_A[name], self.delta_B[name]
            result = result + ((x.to(A.dtype) @ A.T) @ B.T).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "delta." + super().__repr__()
