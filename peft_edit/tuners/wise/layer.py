"""WISE's layer: side memories beside one MLP output projection, and the router that picks one per token.

Per adapter the layer holds ``wise_delta`` (slots, out, in): side memory ``m`` computes
``W x + wise_delta[m] x``; and ``wise_threshold`` (slots,): its routing threshold. A slot is a
merged side memory or a shard still being filled; the ledger gives their number, so loading
builds the layer at the right size before the weights arrive.

Routing, per token: for each memory, the mean activation gap ``||D_m x||`` over the text up to
and including this token, divided by the memory's threshold; the memory with the largest ratio
takes the token if the ratio exceeds 1, otherwise the token keeps the projection's own output,
bit for bit. Means run over real tokens only (the attention mask says which), and carry on
across the calls of a KV-cached generation (the tuner tells the layer when a new text starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...architectures import in_out_features
from ..wrapped import WrappedLayer


@dataclass
class RoutingContext:
    """Set by the tuner before each forward of the model: is this a continuation, which tokens are real."""

    continues: bool = False
    attention_mask: torch.Tensor | None = None  # (rows, past + new) or None
    # Per layer and adapter: (sum of gaps (slots, rows), real tokens counted (rows,)) so far.
    running: dict = field(default_factory=dict)


class WiseLayer(WrappedLayer):
    adapter_layer_names = ("wise_delta", "wise_threshold")
    method_title = "WISE"
    storage = "side memories chosen per token by a router"

    def __init__(self, base_layer: nn.Module, adapter_name: str, size: int) -> None:
        self.routing: RoutingContext | None = None
        super().__init__(base_layer, adapter_name, size)

    def create_adapter_state(self, adapter_name: str, size: int) -> None:
        if not hasattr(self, "wise_delta"):
            self.wise_delta = nn.ParameterDict({})
            self.wise_threshold = nn.ParameterDict({})
        d_in, d_out = in_out_features(self.base_layer)
        factory = self.state_factory()
        self.wise_delta[adapter_name] = nn.Parameter(
            torch.zeros(size, d_out, d_in, **factory), requires_grad=False
        )
        self.wise_threshold[adapter_name] = nn.Parameter(torch.ones(size, **factory), requires_grad=False)

    def size(self, adapter_name: str) -> int:
        return self.wise_delta[adapter_name].shape[0]

    @torch.no_grad()
    def append(
        self, adapter_name: str, first_slot: int, deltas: torch.Tensor, thresholds: torch.Tensor
    ) -> tuple[int, int]:
        """Replace the slots from ``first_slot`` on by ``deltas`` (k, out, in) and their thresholds.

        An edit into a shard rewrites that shard's slot (or adds one); a merge replaces a memory's
        shards by the merged memory. Returns the slot that now holds the edit (the last one).
        """
        old_delta, old_threshold = self.wise_delta[adapter_name], self.wise_threshold[adapter_name]
        if deltas.shape[1:] != old_delta.shape[1:] or thresholds.shape != deltas.shape[:1]:
            raise ValueError(
                f"Side memories of shape {tuple(deltas.shape)} (thresholds {tuple(thresholds.shape)}) do not fit "
                f"a projection whose memories are {tuple(old_delta.shape[1:])}."
            )
        if not 0 <= first_slot <= old_delta.shape[0]:
            raise ValueError(f"Slot {first_slot} is out of range for {old_delta.shape[0]} side memories.")
        delta = torch.cat([old_delta[:first_slot], deltas.to(old_delta)])
        threshold = torch.cat([old_threshold[:first_slot], thresholds.to(old_threshold)])
        self.wise_delta[adapter_name] = nn.Parameter(delta, requires_grad=False)
        self.wise_threshold[adapter_name] = nn.Parameter(threshold, requires_grad=False)
        return delta.shape[0] - 1, delta.shape[0]

    # ---------------------------------------------------------------- forward
    def apply(self, adapter_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        delta, threshold = self.wise_delta[adapter_name], self.wise_threshold[adapter_name]
        rows = self._rows(x)
        x3 = x.reshape(rows, -1, x.shape[-1]).to(delta.dtype)
        side = torch.einsum("bti,moi->mbto", x3, delta)  # what each memory adds, (slots, rows, T, out)
        gaps = side.norm(dim=-1)  # (slots, rows, T)
        valid = self._valid(rows, x3.shape[1], x3.device).to(gaps.dtype)
        summed, counted = self._carried(adapter_name, delta.shape[0], rows, gaps)
        running_sum = summed[:, :, None] + (gaps * valid).cumsum(-1)
        running_count = counted[:, None] + valid.cumsum(-1)
        self._carry(adapter_name, running_sum[:, :, -1], running_count[:, -1])
        ratio = running_sum / running_count.clamp(min=1) / threshold[:, None, None]
        best_ratio, best = ratio.max(0)  # (rows, T)
        routed = (best_ratio > 1) & valid.bool()
        if not routed.any():
            return output
        chosen = side.gather(0, best[None, :, :, None].expand(1, *side.shape[1:])).squeeze(0)
        out3 = output.reshape(rows, -1, output.shape[-1])
        # where(), not a masked sum: tokens that stay with the main memory keep its output bit for bit.
        return torch.where(routed[..., None], out3 + chosen.to(out3.dtype), out3).view_as(output)

    def _rows(self, x: torch.Tensor) -> int:
        if x.dim() == 3:
            return x.shape[0]
        # Models that flatten rows and tokens before the MLP (OPT): the attention mask knows the rows.
        mask = self.routing.attention_mask if self.routing is not None else None
        return mask.shape[0] if mask is not None else 1

    def _valid(self, rows: int, tokens: int, device) -> torch.Tensor:
        mask = self.routing.attention_mask if self.routing is not None else None
        if mask is None or mask.dim() != 2 or mask.shape[0] != rows or mask.shape[1] < tokens:
            return torch.ones(rows, tokens, dtype=torch.bool, device=device)
        return mask[:, -tokens:].to(device).bool()

    def _carried(self, adapter_name: str, slots: int, rows: int, gaps: torch.Tensor):
        zero = (gaps.new_zeros(slots, rows), gaps.new_zeros(rows))
        if self.routing is None or not self.routing.continues:
            return zero
        carried = self.routing.running.get((id(self), adapter_name))
        if carried is None or carried[0].shape != (slots, rows):
            return zero  # e.g. the batch changed shape: start afresh
        return carried

    def _carry(self, adapter_name: str, summed: torch.Tensor, counted: torch.Tensor) -> None:
        if self.routing is not None:
            self.routing.running[(id(self), adapter_name)] = (summed.detach(), counted.detach())
