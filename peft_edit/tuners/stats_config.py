"""Config fields for methods that read the key statistics of an MLP output projection.

ROME, MEMIT and AlphaEdit solve their weight updates under the keys' second moment ``E[k kᵀ]``;
T-Patcher whitens a new patch's key direction with it. The statistics themselves are computed and
cached by :mod:`peft_edit.stats` (through :func:`peft_edit.tuners.per_model.second_moments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import EditConfig


@dataclass
class KeyStatisticsConfig(EditConfig):
    stats_corpus: str = field(
        default="identity",
        metadata={
            "help": "Key covariance C: 'identity' (no statistics), a text file path such as WikiText, a "
            "`datasets` name, or 'model' (text sampled from the model itself: offline but slow on a CPU, "
            "~9 min for 20k tokens of a 135M model)."
        },
    )
    stats_samples: int = field(default=20_000, metadata={"help": "Tokens used for the key covariance."})
    stats_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where covariance statistics are cached (default ~/.cache/peft_edit/stats)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stats_samples < 1:
            raise ValueError(f"{type(self).__name__}.stats_samples must be at least 1.")
