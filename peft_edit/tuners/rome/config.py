"""ROME's hyperparameters; every one has a default that works without per-model settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...architectures import UnsupportedModelError, mlp_out_name, num_layers
from ..config import EditConfig

# ROME edits one early-to-middle MLP layer, where causal tracing finds subject facts recalled at the
# subject's last token. Published choices sit near a sixth of the depth: GPT-J (28 blocks) 5,
# Llama-2-7B and Mistral-7B (32) 5, Qwen-7B (32) 5; so the default is round(depth / 6).
DEFAULT_LAYER_FRACTION = 1 / 6


def default_edit_layer(depth: int) -> int:
    return min(depth - 1, max(1, round(depth * DEFAULT_LAYER_FRACTION)))


@dataclass
class RomeConfig(EditConfig):
    """Rank-One Model Editing (Meng et al., 2022) with the consistent-key update of R-ROME (Gupta et al., 2024)."""

    layer: int | None = field(
        default=None,
        metadata={"help": "Block whose MLP output projection is edited; default round(depth/6)."},
    )
    v_num_steps: int = field(default=25, metadata={"help": "Optimisation steps for the value vector."})
    v_lr: float = field(default=0.5, metadata={"help": "Adam learning rate for the value vector."})
    v_weight_decay: float = field(default=1e-3, metadata={"help": "Weight of ||δ||²/||v||² in the loss."})
    clamp_norm_factor: float = field(
        default=4.0, metadata={"help": "||δ|| is kept below this times ||v|| (the original value)."}
    )
    kl_factor: float = field(
        default=0.0625, metadata={"help": "Weight of the KL term that keeps '{subject} is a' predictions."}
    )
    early_stop_loss: float = field(
        default=0.05,
        metadata={"help": "Stop optimising once the target's negative log-likelihood is below this."},
    )
    kl_prompts: list[str] = field(
        default_factory=lambda: ["{} is a"],
        metadata={"help": "Prompts whose predictions about the subject must not drift."},
    )
    context_template_lengths: list[int] = field(
        default_factory=lambda: [5, 10], metadata={"help": "Token lengths of the sampled prefixes."}
    )
    context_templates_per_length: int = field(
        default=5, metadata={"help": "Sampled prefixes per length (plus the bare prompt)."}
    )
    stats_corpus: str = field(
        default="identity",
        metadata={
            "help": "Key covariance C: 'identity' (no statistics; EasyEdit's default, and the offline default), "
            "a text file path such as WikiText, a `datasets` name, or 'model' (text sampled from the model itself: "
            "offline but slow on a CPU, ~9 min for 20k tokens of a 135M model)."
        },
    )
    stats_samples: int = field(default=20_000, metadata={"help": "Tokens used for the key covariance."})
    stats_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where covariance statistics are cached (default ~/.cache/peft_edit/stats)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for the sampled prefixes (and sampled corpus)."})

    method = "rome"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"RomeConfig.layer must be >= 0, got {self.layer}.")
        if self.v_num_steps < 1:
            raise ValueError("RomeConfig.v_num_steps must be at least 1.")
        if self.clamp_norm_factor <= 0 or self.v_lr <= 0:
            raise ValueError("RomeConfig.clamp_norm_factor and v_lr must be positive.")
        for p in self.kl_prompts:
            if p.count("{}") != 1:
                raise ValueError(
                    f"RomeConfig.kl_prompts entries need exactly one '{{}}' for the subject, got {p!r}."
                )

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
