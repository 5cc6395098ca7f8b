"""AlphaEdit's hyperparameters (on top of MEMIT's, whose layers and value optimisation it shares)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..memit.config import MemitConfig


@dataclass
class AlphaEditConfig(MemitConfig):
    """AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of the preserved keys."""

    nullspace_threshold: float = field(
        default=1.0,
        metadata={
            "help": "Covariance eigen-directions whose eigenvalue is below this times the mean eigenvalue form "
            "the null space the update is confined to (relative, so it carries across models; on SmolLM2 it "
            "keeps ~3/4 of the directions, as AlphaEdit's absolute 2e-2 does on its models, but SmolLM2's "
            "spectrum is flat: those directions still hold ~30% of ordinary text's key energy, see "
            "benchmarks/nullspace.py)."
        },
    )
    regularization: float = field(
        default=0.05,
        metadata={
            "help": "Ridge term of the solve, in units of the preserved keys' mean squared norm "
            "(AlphaEdit's L2); larger: smaller updates. On 10 CounterFact edits of SmolLM2, 0.5 reached "
            "efficacy 0.8, 0.05 and 0.005 0.9, with the same locality."
        },
    )
    stats_corpus: str = field(
        default="model",
        metadata={
            "help": "Corpus for the preserved keys' covariance (required: the null space comes from it): a text "
            "file such as WikiText, a `datasets` name, or 'model' (text the model samples itself; offline but "
            "slow on a CPU, ~9 min for 20k tokens of a 135M model, then cached)."
        },
    )

    method = "alphaedit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stats_corpus == "identity":
            raise ValueError(
                "AlphaEditConfig needs key statistics: its null space comes from their covariance. Set "
                "stats_corpus to a text file (e.g. WikiText), a `datasets` name, or 'model'."
            )
        if self.nullspace_threshold <= 0 or self.regularization < 0:
            raise ValueError("AlphaEditConfig.nullspace_threshold must be > 0 and regularization >= 0.")
