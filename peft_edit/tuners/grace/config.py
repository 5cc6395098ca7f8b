"""GRACE's hyperparameters; every one has a default that works without per-model settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...architectures import Layout, mlp_out_name
from ..wrapped.config import OneBlockConfig

# GRACE reads keys late in the network, where a prompt's last token already encodes what comes
# next: there, paraphrases of one question sit closer together than unrelated prompts do.
# (SmolLM2, 30 blocks, ZsRE: at block 24 a rephrase is nearer to its own question's key than to
# any other question's in 65% of cases, against 40-50% at blocks 4-20; NQ questions stay at
# least 0.85 key norms from every key at any depth.)
DEFAULT_LAYER_FRACTION = 0.8

# The radius is relative to the key's norm. On SmolLM2 at block 24, a zsRE rephrase sits a median
# 0.33 norms from its question's key, prompts about other CounterFact subjects at least 0.27 from
# the nearest of 100 edit keys (2nd percentile), and NQ questions at least 0.95: 0.3 kept all 20
# unrelated prompts tested after 25 edits, where 0.5 changed the answer of one.
DEFAULT_INIT_RADIUS = 0.3

# Above 0.5 a target token is the greedy choice whatever the other tokens get, which is what an
# edit must achieve. A higher bar costs sentence-long targets dearly (SmolLM2, 8 hallucination
# corrections of 10-53 tokens: 0.9 took 38-294 Adam steps, 0.5 took 22-93) and bought nothing on
# short answers (50 sequential zsRE edits scored the same with either).
EARLY_STOP_PROB = 0.5

STOP_RULES = ("every_token", "mean")


def default_grace_layer(depth: int) -> int:
    return min(depth - 1, max(1, round(depth * DEFAULT_LAYER_FRACTION)))


def grace_site_name(layout: Layout, layer: int) -> str:
    """The module GRACE wraps in block ``layer``: the MLP (its input is the key, its output replaced).

    Families whose MLP projections sit directly in the block (OPT) have no MLP module; there the
    output projection is wrapped instead.
    """
    projection = mlp_out_name(layout, layer)
    mlp = projection.rpartition(".")[0]
    return projection if mlp == f"{layout.layers}.{layer}" else mlp


@dataclass
class GraceConfig(OneBlockConfig):
    """GRACE (Hartvigsen et al., 2023): a key-value codebook with deferral radii at one MLP.

    The wrapped MLP's input at an edit's last prompt token is the key; the value, optimised so
    the model then emits the target, replaces the MLP's output wherever an input falls within a
    key's radius. Everything else passes through unchanged.
    """

    layer: int | None = field(
        default=None,
        metadata={"help": "Block whose MLP holds the codebook; default round(0.8 * depth)."},
    )
    init_radius: float = field(
        default=DEFAULT_INIT_RADIUS,
        metadata={
            "help": "Deferral radius of a new key, as a fraction of the key's norm (so it means the same on "
            "every model). Larger generalises to more paraphrases and risks more unrelated prompts."
        },
    )
    value_steps: int = field(default=100, metadata={"help": "Most Adam steps used to optimise a value."})
    value_lr: float = field(
        default=2.0,
        metadata={
            "help": "Adam learning rate for the value, in units of the module's output RMS (so it means the "
            "same on every model). On SmolLM2, 2.0 with the optimiser's short moment memories (VALUE_BETAS) "
            "took 40 % fewer steps than 1.0 with torch's; 0.1 needed 65-100 steps for a short answer."
        },
    )
    early_stop_prob: float = field(
        default=EARLY_STOP_PROB,
        metadata={
            "help": "Stop optimising a value once every target token has at least this probability "
            "(stop_rule='mean': once their mean log-probability reaches its log)."
        },
    )
    stop_rule: str = field(
        default="every_token",
        metadata={
            "help": "When a value's optimisation ends. 'every_token': every target token has probability at "
            "least early_stop_prob (or leads by stop_margin). 'mean': every target token is the greedy choice "
            "(leads every other token by more than stop_margin, 0 if None) and the target's mean "
            "log-probability reaches log(early_stop_prob): a long target stops once each token wins instead "
            "of waiting for the one whose rivals share the rest of the probability."
        },
    )
    stop_margin: float | None = field(
        default=None,
        metadata={
            "help": "Also stop once every target token that is not yet that likely leads every other token "
            "by this many nats (log-probability): then too it is the greedy choice. None: probability only."
        },
    )
    replace_tolerance: float = field(
        default=1e-3,
        metadata={
            "help": "A new key closer than this (times its norm) to a stored one is the same prompt: its "
            "entry is overwritten (a correction of an earlier edit) instead of split. An expanded radius "
            "reaches this far past the key it was widened for."
        },
    )

    method = "grace"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_radius <= 0:
            raise ValueError(f"GraceConfig.init_radius must be positive, got {self.init_radius}.")
        if not 0 < self.early_stop_prob < 1:
            raise ValueError(f"GraceConfig.early_stop_prob must be in (0, 1), got {self.early_stop_prob}.")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"GraceConfig.stop_rule must be one of {STOP_RULES}, got {self.stop_rule!r}.")
        if self.stop_margin is not None and self.stop_margin < 0:
            raise ValueError(f"GraceConfig.stop_margin must be at least 0 (or None), got {self.stop_margin}.")
        if self.value_steps < 1 or self.value_lr <= 0:
            raise ValueError("GraceConfig.value_steps must be at least 1 and value_lr positive.")
        if not 0 < self.replace_tolerance < self.init_radius:
            raise ValueError("GraceConfig.replace_tolerance must be in (0, init_radius).")

    def default_layer(self, depth: int) -> int:
        return default_grace_layer(depth)

    def site_name(self, layout: Layout, layer: int) -> str:
        return grace_site_name(layout, layer)
