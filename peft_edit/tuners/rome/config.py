"""ROME's hyperparameters; every one has a default that works without per-model settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...architectures import UnsupportedModelError, mlp_out_name, num_layers
from ..locate.config import LocateThenEditConfig

# ROME edits one early-to-middle MLP layer, where causal tracing finds subject facts recalled at the
# subject's last token. Published choices sit near a sixth of the depth: GPT-J (28 blocks) 5,
# Llama-2-7B and Mistral-7B (32) 5, Qwen-7B (32) 5; so the default is round(depth / 6).
DEFAULT_LAYER_FRACTION = 1 / 6


def default_edit_layer(depth: int) -> int:
    return min(depth - 1, max(1, round(depth * DEFAULT_LAYER_FRACTION)))


@dataclass
class RomeConfig(LocateThenEditConfig):
    """Rank-One Model Editing (Meng et al., 2022) with the consistent-key update of R-ROME (Gupta et al., 2024)."""

    layer: int | None = field(
        default=None,
        metadata={"help": "Block whose MLP output projection is edited; default round(depth/6)."},
    )
    # The value optimisation and statistics fields are LocateThenEditConfig's (shared with MEMIT).

    method = "rome"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"RomeConfig.layer must be >= 0, got {self.layer}.")

    def choose_target_modules(self, model: nn.Module) -> list[str]:
        layout = self.layout(model)
        depth = num_layers(model, layout)
        if self.layer is None:
            self.layer = default_edit_layer(depth)
        if self.layer >= depth:
            raise UnsupportedModelError(
                f"RomeConfig.layer={self.layer}, but the model has only {depth} blocks."
            )
        return [mlp_out_name(layout, self.layer)]
