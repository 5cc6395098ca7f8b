"""MEMIT's hyperparameters; every one has a default that works without per-model settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...architectures import UnsupportedModelError, mlp_out_name, num_layers
from ..locate.config import LocateThenEditConfig

# MEMIT spreads each edit over consecutive MLP layers in the early-middle of the network, where
# causal tracing finds subject facts recalled. Published windows end near a quarter of the depth
# (Llama-2-7B and Llama-3-8B: 4-8 of 32; GPT-J: 3-8 of 28), so the default is the five blocks
# ending at round(depth / 4).
DEFAULT_WINDOW = 5
DEFAULT_LAST_LAYER_FRACTION = 1 / 4

# Requests per value optimisation when v_batch_size is None (see its help).
CPU_VALUE_BATCH = 2
ACCELERATOR_VALUE_BATCH = 32


def default_edit_layers(depth: int) -> list[int]:
    last = min(depth - 1, max(0, round(depth * DEFAULT_LAST_LAYER_FRACTION)))
    first = max(0, last - DEFAULT_WINDOW + 1)
    return list(range(first, last + 1))


@dataclass
class MemitConfig(LocateThenEditConfig):
    """Mass-Editing Memory in a Transformer (Meng et al., 2023): many edits at once over several MLP layers."""

    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Blocks whose MLP output projections share the edits, lowest first; default the five "
            "blocks ending at round(depth/4)."
        },
    )
    mom2_update_weight: float | None = field(
        default=None,
        metadata={
            "help": "λ: weight of the preserved keys' covariance against the new keys in the least-squares "
            "update. Larger: smaller, safer updates. Default: the key dimension (the projection's input "
            "size), which is what MEMIT's 15000 amounts to on GPT-J (16384) and Llama-2-7B (11008)."
        },
    )
    clamp_norm_factor: float = field(
        default=0.75, metadata={"help": "||δ|| is kept below this times ||v|| (MEMIT's value)."}
    )
    context_template_lengths: list[int] = field(
        default_factory=lambda: [10], metadata={"help": "Token lengths of the sampled prefixes (MEMIT's: one)."}
    )
    context_templates_per_length: int = field(
        default=5, metadata={"help": "Sampled prefixes per length (plus the bare prompt): MEMIT's 5."}
    )
    v_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Requests whose δ are optimised together: bounds memory, results do not depend on it. "
            "Default: 2 on the CPU, where a larger batch barely saves time while its autograd graph grows "
            "with it (SmolLM2, 16 requests: 8 at a time peaked about 950 MiB above the loaded model, 4 at a "
            "time 500 MiB, 2 at a time 300 MiB; 100 requests on two threads took 4.7 s each with 2 against "
            "3.6 s with 4, the price of staying under twice the model's memory); 32 on an accelerator, "
            "where batching is what makes it fast."
        },
    )

    method = "memit"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.layers is not None:
            if not self.layers or any(layer < 0 for layer in self.layers):
                raise ValueError(
                    f"{name}.layers must be a non-empty list of block indices >= 0, got {self.layers}."
                )
            if sorted(set(self.layers)) != list(self.layers):
                raise ValueError(f"{name}.layers must be increasing without repeats, got {self.layers}.")
        if self.mom2_update_weight is not None and self.mom2_update_weight < 0:
            raise ValueError(f"{name}.mom2_update_weight must be >= 0.")
        if self.v_batch_size is not None and self.v_batch_size < 1:
            raise ValueError(f"{name}.v_batch_size must be at least 1 (or None for the device's default).")

    def value_batch_size(self, device: torch.device | str) -> int:
        """``v_batch_size``, or its default for ``device`` (2 on the CPU, 32 elsewhere)."""
        if self.v_batch_size is not None:
            return self.v_batch_size
        return CPU_VALUE_BATCH if torch.device(device).type == "cpu" else ACCELERATOR_VALUE_BATCH

    def choose_target_modules(self, model: nn.Module) -> list[str]:
        layout = self.layout(model)
        depth = num_layers(model, layout)
        if self.layers is None:
            self.layers = default_edit_layers(depth)
        if self.layers[-1] >= depth:
            raise UnsupportedModelError(
                f"{type(self).__name__}.layers={self.layers}, but the model has only {depth} blocks."
            )
        return [mlp_out_name(layout, layer) for layer in self.layers]
