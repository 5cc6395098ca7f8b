"""WISE's hyperparameters; every one has a default that works without per-model settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..site_training import OPTIMIZERS
from ..wrapped.config import SiteTrainingConfig

# WISE edits a late MLP: Llama-2-7B's block 27 of 32 in the paper and EasyEdit. Scaled to depth.
DEFAULT_LAYER_FRACTION = 27 / 32
STOP_RULES = ("margins", "routing")


@dataclass
class WiseConfig(SiteTrainingConfig):
    """WISE (Wang et al., 2024): edits go to side copies of one MLP output projection, chosen by a router.

    Side memory ``m`` computes ``W x + D_m x``; a token is routed to it when the mean activation
    gap ``||D_m x||`` over the text so far exceeds the memory's threshold. Edits are written
    ``edits_per_shard`` at a time into one shard (a random subspace of the projection, a fraction
    ``mask_ratio`` of its entries); every ``shards_per_memory`` shards are Ties-merged into one
    side memory.
    """

    layer: int | None = field(
        default=None,
        metadata={
            "help": "Block whose MLP output projection gets side memories; default 27/32 of the depth."
        },
    )
    edits_per_shard: int = field(
        default=10,
        metadata={
            "help": "Edits written into one shard (one random subspace) before the next shard starts. On "
            "SmolLM2's first 50 hallucination corrections 1 held reliability 0.95 and locality 1.00 against "
            "0.74 and 0.96 with 10 (a memory then answers to one passage only), at one side memory per edit; on "
            "50 zsRE edits it cost reliability (0.94 against 1.00) and generalization (0.72 against 0.87)."
        },
    )
    shards_per_memory: int = field(
        default=1,
        metadata={
            "help": "Shards Ties-merged into one side memory once all of them are full (1: never merge; "
            "the paper merges). Merging halves the memories held, but on SmolLM2 after 50 zsRE edits it "
            "cost locality: 0.69 teacher-forced (greedy 0.44) with 2, against 0.85 (0.78) with 1, as "
            "the merged memory's gaps on unrelated text add up while its threshold still comes from its "
            "edits' smallest gap."
        },
    )
    mask_ratio: float = field(
        default=0.2,
        metadata={"help": "Fraction of the projection's entries a shard may change (its subspace)."},
    )
    merge_density: float = field(
        default=0.53,
        metadata={
            "help": "Ties merging keeps this fraction of the projection's entries in each shard, the largest "
            "changes first (the paper's value). The fraction counts every entry, as the paper's code does, so "
            "at or above mask_ratio a shard's whole subspace is kept."
        },
    )
    act_ratio: float = field(
        default=0.88,
        metadata={
            "help": "A memory's routing threshold is this times the smallest activation gap of its edits."
        },
    )
    irrelevant_margin: float = field(
        default=0.1,
        metadata={
            "help": "Activation gaps on unrelated text are pushed below this (times the projection's mean output norm)."
        },
    )
    edit_margin: float = field(
        default=0.4,
        metadata={
            "help": "Activation gaps on the edit are pushed above this (times the projection's mean output norm)."
        },
    )
    gap_margin: float = field(
        default=0.3,
        metadata={"help": "Edit gaps must exceed unrelated gaps by this much (times the mean output norm)."},
    )
    irrelevant_weight: float = field(
        default=10.0,
        metadata={
            "help": "Weight of the loss that keeps gaps on unrelated text below irrelevant_margin. At 1 the "
            "target's likelihood wins and the memory fires on any question (SmolLM2: 90% of unseen questions "
            "routed after 25 edits, 52% at 10)."
        },
    )
    num_steps: int = field(
        default=60,
        metadata={
            "help": "Most optimisation steps per edit (it stops once the target and the margins are met)."
        },
    )
    lr: float = field(
        default=0.01,
        metadata={
            "help": "Learning rate of the side memory's entries (Adam: about how far one step moves an entry)."
        },
    )
    optimizer: str = field(
        default="adam",
        metadata={
            "help": "'adam' or 'sgd' (the paper's; use lr=1.0 with it). On SmolLM2, SGD at lr 1.0 left "
            "hallucination corrections unlearnt after 60 steps (target NLL ~1.4, teacher-forced "
            "reliability 0.57 after 25 edits), and at 0.2 a shard's second zsRE edit; Adam at 0.01 "
            "brought the NLL to ~0.15-0.19 in the same steps."
        },
    )
    stop_rule: str = field(
        default="margins",
        metadata={
            "help": "When an edit's training stops before num_steps. 'margins' (the paper's losses as the "
            "rule): once the NLL is below early_stop_loss and every margin holds; on SmolLM2 they come "
            "within a few per cent but rarely all hold, so edits take num_steps. 'routing' (faster, less "
            "general): once every target token is the most likely one (or the NLL is below early_stop_loss) "
            "and the router, with the threshold the memory would get, sends none of the unrelated texts to "
            "the memory; over the first 70 zsRE edits 14 s per edit against ~30 s, and after 30 edits "
            "generalization 0.71 against 0.86 teacher-forced (greedy 0.40 against 0.57), reliability 0.94 "
            "against 1.00."
        },
    )
    replay: bool = field(
        default=True,
        metadata={
            "help": "Retrain the shard's earlier edits with each new one, so the shard does not forget them."
        },
    )

    method = "wise"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.edits_per_shard < 1 or self.shards_per_memory < 1:
            raise ValueError("WiseConfig.edits_per_shard and shards_per_memory must be at least 1.")
        if not 0 < self.mask_ratio <= 1 or not 0 < self.merge_density <= 1:
            raise ValueError("WiseConfig.mask_ratio and merge_density must be in (0, 1].")
        if not 0 < self.act_ratio <= 1:
            raise ValueError(f"WiseConfig.act_ratio must be in (0, 1], got {self.act_ratio}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"WiseConfig.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}.")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"WiseConfig.stop_rule must be one of {STOP_RULES}, got {self.stop_rule!r}.")
        if self.irrelevant_weight < 0:
            raise ValueError(f"WiseConfig.irrelevant_weight must be >= 0, got {self.irrelevant_weight}.")
        if self.edit_margin <= self.irrelevant_margin:
            raise ValueError("WiseConfig.edit_margin must be larger than irrelevant_margin.")

    @classmethod
    def check_kwargs(cls, **kwargs):
        # A config saved before the optimizer field was trained with SGD, and its lr is SGD's:
        # further edits of such an adapter go on with SGD.
        kwargs = super().check_kwargs(**kwargs)
        if "optimizer" not in kwargs and "lr" in kwargs:
            kwargs["optimizer"] = "sgd"
        return kwargs

    def default_layer(self, depth: int) -> int:
        return min(depth - 1, int(depth * DEFAULT_LAYER_FRACTION))

    # ---------------------------------------------------------------- ledger
    @property
    def edits_per_memory(self) -> int:
        return self.edits_per_shard * self.shards_per_memory

    def placement(self, edit_index: int) -> tuple[int, int, int]:
        """(memory, shard within it, position within the shard) of the ``edit_index``-th edit (0-based)."""
        memory, rest = divmod(edit_index, self.edits_per_memory)
        shard, position = divmod(rest, self.edits_per_shard)
        return memory, shard, position

    def module_rank(self, module_name: str) -> int:
        """Side memories + unmerged shards held: the newest edit always sits in the last one.

        (A merge folds a memory's shards into one, so older entries' slots can be smaller than
        the count; the maximum the base class takes would overcount.)
        """
        for entry in reversed(self.edits):
            if module_name in entry["modules"]:
                return entry["modules"][module_name][1]
        return 0
