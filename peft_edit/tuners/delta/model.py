"""The tuner of every method whose edits are weight deltas (ROME, MEMIT, AlphaEdit, FT, ...)."""

from __future__ import annotations

import os

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from ...atomic import atomic_directory
from ..tuner import EditTuner
from .layer import DeltaLayer


class DeltaTuner(EditTuner):
    tuner_layer_cls = DeltaLayer

    def forget(self, adapter_name: str, entry: dict, request_index: int) -> bool:
        """Zero the request's own components, when each request of the entry owns an equal share of
        every module's rank slice (ROME: one rank-one slice per request; MEMIT: one component per
        request per layer). Dense deltas have no per-request parts: kept, and False returned."""
        n = len(entry["requests"])
        spans = {}
        for name, (start, stop) in entry["modules"].items():
            layer = self._layer(name)
            if layer.is_dense(adapter_name) or (stop - start) % n:
                return False
            width = (stop - start) // n
            spans[name] = (start + request_index * width, start + (request_index + 1) * width)
        for name, (start, stop) in spans.items():
            self._layer(name).zero_components(adapter_name, start, stop)
        return True

    def save_as_lora(self, path: str | os.PathLike, adapter_name: str | None = None) -> LoraConfig:
        """Write the edits as a stock LoRA adapter that plain peft loads, without peft_edit.

        The factors are written as they are (``lora_alpha == r`` per module, so LoRA's scaling is
        1), which makes the export exact rather than an SVD approximation. A layer holding a dense
        delta is factored by SVD at the delta's full numerical rank: exact up to float rounding.
        """
        adapter_name = self._active_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        state_dict, ranks, conv1d = {}, {}, set()
        for name in config.target_modules:
            layer = self._layer(name)
            rank = layer.rank(adapter_name)
            if rank == 0:
                continue
            if layer.is_conv1d:
                conv1d.add(name)
            A, B = lora_factors(layer, adapter_name)
            ranks[name] = A.shape[0]
            prefix = f"base_model.model.{name}"
            state_dict[f"{prefix}.lora_A.weight"] = A
            state_dict[f"{prefix}.lora_B.weight"] = B
        if not state_dict:
            raise ValueError("The adapter holds no edits yet; there is nothing to export as LoRA.")
        if conv1d and conv1d != set(ranks):
            raise ValueError("Cannot export a mix of Conv1D and Linear targets as one LoRA adapter.")
        top = max(ranks.values())
        lora_config = LoraConfig(
            r=top,
            lora_alpha=top,
            target_modules=sorted(ranks),
            rank_pattern=dict(ranks),
            alpha_pattern=dict(ranks),
            fan_in_fan_out=bool(conv1d),
            lora_dropout=0.0,
            bias="none",
            task_type=config.task_type,
            base_model_name_or_path=config.base_model_name_or_path,
        )
        with atomic_directory(path) as staging:
            save_file(
                state_dict, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"}
            )
            lora_config.save_pretrained(str(staging))
        return lora_config


@torch.no_grad()
def lora_factors(layer: DeltaLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` equal to the layer's delta (exactly for factors; up to rounding if dense)."""
    if not layer.is_dense(adapter_name):
        return (
            layer.delta_A[adapter_name].detach().contiguous().clone(),
            layer.delta_B[adapter_name].detach().contiguous().clone(),
        )
    delta = layer.delta_dense[adapter_name].detach()
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = int((S > S[0] * torch.finfo(delta.dtype).eps * max(delta.shape)).sum()) if S.numel() else 0
    keep = max(keep, 1)
    B = (U[:, :keep] * S[:keep]).to(delta.dtype).contiguous()
    A = Vh[:keep].to(delta.dtype).contiguous()
    return A, B
