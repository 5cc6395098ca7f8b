"""T-Patcher's hyperparameters; every one has a default that works without per-model settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..stats_config import KeyStatisticsConfig
from ..wrapped.config import SiteTrainingConfig


@dataclass
class TPatcherConfig(SiteTrainingConfig, KeyStatisticsConfig):
    """Transformer-Patcher (Huang et al., 2023): one patch neuron per edit beside a late MLP.

    A patch is a key ``k``, a bias ``b`` and a value ``v``; at every token it adds
    ``relu(k·x + b) v`` to the MLP's output, where ``x`` is the input of the MLP's output
    projection. It is trained to fire on the edit (pre-activation at least 1 where the target is
    predicted) and stay silent (at most -1) on keys of unrelated text and of earlier edits.

    An edit gets one patch per target token (a patch adds one value vector, which can push one
    token). A patch's key starts along the edit's keys whitened by the keys' second moment
    ``E[k kᵀ]`` over ``stats_corpus``; with ``"identity"`` it is estimated from the unrelated
    texts' keys alone, which tells an edit from other questions far less well (see the README's
    lifelong benchmark).
    """

    layer: int | None = field(
        default=None,
        metadata={"help": "Block whose MLP gets the patches; default the last one, as in the paper."},
    )
    num_steps: int = field(default=30, metadata={"help": "Optimisation steps per patch."})
    lr: float = field(
        default=0.1,
        metadata={
            "help": "Adam learning rate, in units where one step moves a pre-activation or the value by about lr."
        },
    )
    stats_corpus: str = field(
        default="model",
        metadata={
            "help": "Corpus of the key second moment the patch keys are whitened with: 'model' (text the model "
            "samples itself: offline, ~7 min per layer for a 135M model on a CPU, then cached), a text file "
            "such as WikiText, a `datasets` name, or 'identity' (estimate it from the unrelated texts)."
        },
    )
    boundary: float = field(
        default=0.9,
        metadata={
            "help": "Where a new patch starts to fire, between the memory's closest key (0) and the edit's (1); "
            "higher is more specific."
        },
    )
    fire_threshold: float = field(
        default=0.5,
        metadata={
            "help": "A patch adds its value only where its pre-activation exceeds this, in units where the "
            "training puts the edit at 1 and unrelated text at -1; 0 is the paper's plain ReLU. Stray firings "
            "on unseen text are mostly weak, and with hundreds of patches they add up."
        },
    )
    key_ridge: float = field(
        default=0.01,
        metadata={
            "help": "Ridge added to the key second moment before whitening, in units of its mean diagonal; "
            "larger: a direction closer to the plain difference of means (fires more widely)."
        },
    )
    activation_weight: float = field(
        default=1.0, metadata={"help": "Weight of the activation loss (the patch must fire on the edit)."}
    )
    memory_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the memory loss (the patch must stay silent on other text)."},
    )

    method = "tpatcher"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.boundary < 1:
            raise ValueError(f"TPatcherConfig.boundary must be in (0, 1), got {self.boundary}.")
        if not 0 <= self.fire_threshold < 1:
            raise ValueError(f"TPatcherConfig.fire_threshold must be in [0, 1), got {self.fire_threshold}.")
        if self.key_ridge <= 0:
            raise ValueError(f"TPatcherConfig.key_ridge must be positive, got {self.key_ridge}.")
        if self.activation_weight < 0 or self.memory_weight < 0:
            raise ValueError("TPatcherConfig.activation_weight and memory_weight must be >= 0.")

    def default_layer(self, depth: int) -> int:
        return depth - 1
