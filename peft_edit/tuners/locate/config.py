"""Hyperparameters shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

Each of them optimises, per request, a value change δ at the subject's last token (the same
recipe: prefixed prompts, a KL term, a norm clamp) and solves for a weight update under the key
covariance of the edited layers (the fields of :class:`KeyStatisticsConfig`). The fields for those
two steps live here once; each method's config adds its own and may override a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..stats_config import KeyStatisticsConfig


@dataclass
class LocateThenEditConfig(KeyStatisticsConfig):
    v_num_steps: int = field(default=25, metadata={"help": "Optimisation steps for the value change δ."})
    v_lr: float = field(default=0.5, metadata={"help": "Adam learning rate for δ."})
    v_weight_decay: float = field(default=1e-3, metadata={"help": "Weight of ||δ||²/||v||² in the loss."})
    clamp_norm_factor: float = field(
        default=4.0, metadata={"help": "||δ|| is kept below this times ||v|| (the original value)."}
    )
    kl_factor: float = field(
        default=0.0625, metadata={"help": "Weight of the KL term that keeps '{subject} is a' predictions."}
    )
    early_stop_loss: float = field(
        default=0.05,
        metadata={
            "help": "Stop optimising a request's δ once its target's negative log-likelihood is below this."
        },
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
    seed: int = field(default=0, metadata={"help": "Seed for the sampled prefixes (and sampled corpus)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.v_num_steps < 1:
            raise ValueError(f"{name}.v_num_steps must be at least 1.")
        if self.clamp_norm_factor <= 0 or self.v_lr <= 0:
            raise ValueError(f"{name}.clamp_norm_factor and v_lr must be positive.")
        for p in self.kl_prompts:
            if p.count("{}") != 1:
                raise ValueError(
                    f"{name}.kl_prompts entries need exactly one '{{}}' for the subject, got {p!r}."
                )
