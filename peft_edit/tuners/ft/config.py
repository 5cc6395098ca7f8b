"""FT-L and FT-M's hyperparameters; every one has a default that works without per-model settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ...architectures import UnsupportedModelError, in_out_features, mlp_out_name, num_layers
from ..config import EditConfig

VARIANTS = ("ft-l", "ft-m")

# Fine-tuning baselines edit one late-middle MLP: EasyEdit's FT-L/FT-M use block 21 of 32 for
# Llama-2-7B and Mistral-7B, about two thirds of the depth; so the default is round(2 * depth / 3).
DEFAULT_LAYER_FRACTION = 2 / 3

# FT-L's L∞ bound on each weight's change when none is given. ROME's constrained fine-tuning
# baseline set it per model (5e-4 on GPT-2 XL, 5e-5 on GPT-J, both at block 0). At the default
# block of SmolLM2-135M, 5e-4 leaves every target of 10 CounterFact records unlearnt, 2e-3 flips
# 2 and 5e-3 flips 8 (greedy), so the default is 5e-3.
DEFAULT_FT_L_NORM_CONSTRAINT = 5e-3

# Adam's rate when none is given. A dense delta takes ROME/EasyEdit's 5e-4. Factors need more: the
# change B A moves by about lr·|A| per step, and A starts with entries of order 1/√in; on
# SmolLM2, rank 4 at 5e-4 leaves the target's NLL near 3 after 25 steps, at 5e-3 every target of
# 10 CounterFact records is learnt.
DEFAULT_LR_DENSE = 5e-4
DEFAULT_LR_FACTORS = 5e-3


def default_edit_layer(depth: int) -> int:
    return min(depth - 1, max(0, round(depth * DEFAULT_LAYER_FRACTION)))


@dataclass
class FTConfig(EditConfig):
    """Constrained fine-tuning of chosen projections, stored as a weight delta (dense or low-rank).

    ``variant="ft-l"``: the loss of ROME's FT-L baseline (every target token scored at the prompt's
    last position) and an L∞ bound on each weight's change. ``variant="ft-m"``: the target's
    ordinary conditional likelihood given the prompt, the loss masked to the target tokens
    (EasyEdit's FT-M). See :mod:`peft_edit.tuners.ft.algorithm`.
    """

    variant: str = field(
        default="ft-m",
        metadata={
            "help": "'ft-m': loss masked to the target tokens (conditional NLL of the target given the prompt); "
            "'ft-l': every target token scored at the prompt's last token, with a norm constraint."
        },
    )
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Blocks whose MLP output projection is fine-tuned; default one block, round(2 * depth / 3). "
            "Set `target_modules` instead to fine-tune other projections inside the blocks."
        },
    )
    rank: int | None = field(
        default=None,
        metadata={
            "help": "None: train a dense (out x in) delta per projection; an int r: train LoRA-style factors "
            "B (out x r, zero at the start) and A (r x in), so each edit adds rank r."
        },
    )
    num_steps: int = field(default=25, metadata={"help": "Adam steps per edit() call (ROME/EasyEdit: 25)."})
    lr: float | None = field(
        default=None,
        metadata={
            "help": f"Adam learning rate. None: {DEFAULT_LR_DENSE} for a dense delta (ROME/EasyEdit), "
            f"{DEFAULT_LR_FACTORS} with `rank` (factors learn more slowly)."
        },
    )
    norm_constraint: float | None = field(
        default=None,
        metadata={
            "help": "After each step, every element of the trained change is clamped to ±this (the L∞ "
            f"constraint of FT-L). None: {DEFAULT_FT_L_NORM_CONSTRAINT} for ft-l, unconstrained for ft-m; "
            "float('inf') turns it off for ft-l. With `rank`, the factors are scaled down to respect it."
        },
    )
    early_stop_loss: float = field(
        default=1e-2,
        metadata={
            "help": "Stop once the targets' mean negative log-likelihood is below this (ROME/EasyEdit: 1e-2)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initial A factor when `rank` is set."})

    method = "ft"

    def __post_init__(self) -> None:
        super().__post_init__()
        variant = str(self.variant).strip().lower().replace("_", "-")
        if variant not in VARIANTS:
            raise ValueError(
                f"FTConfig.variant={self.variant!r} is not known; use one of {', '.join(VARIANTS)}."
            )
        self.variant = variant
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                self.layers = [self.layers]
            if not self.layers or any(not _is_int(i) or i < 0 for i in self.layers):
                raise ValueError(
                    f"FTConfig.layers must be a non-empty list of block indices >= 0 (or None), got {self.layers!r}."
                )
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"FTConfig.layers lists a block twice: {self.layers!r}.")
        if self.rank is not None and (not _is_int(self.rank) or self.rank <= 0):
            raise ValueError(
                f"FTConfig.rank must be a positive integer (or None for a dense delta), got {self.rank!r}."
            )
        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise ValueError(f"FTConfig.num_steps must be an integer >= 1, got {self.num_steps!r}.")
        if self.lr is None:
            self.lr = DEFAULT_LR_DENSE if self.rank is None else DEFAULT_LR_FACTORS
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"FTConfig.lr must be a positive number, got {self.lr!r}.")
        if self.norm_constraint is None and self.variant == "ft-l":
            # Written into the config, so a saved adapter says which bound its edits were trained with.
            self.norm_constraint = DEFAULT_FT_L_NORM_CONSTRAINT
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(
                f"FTConfig.norm_constraint must be positive (float('inf') or, for ft-m, None for no bound), "
                f"got {self.norm_constraint!r}."
            )
        if not self.early_stop_loss >= 0:
            raise ValueError(f"FTConfig.early_stop_loss must be >= 0, got {self.early_stop_loss!r}.")

    def resolve(self, model: nn.Module) -> None:
        super().resolve(model)
        # Checked here, before any module is wrapped, so a bad target leaves the model untouched.
        for name in self.target_modules:
            self.block_of(model, name)
            try:
                in_out_features(model.get_submodule(name))
            except UnsupportedModelError as err:
                raise UnsupportedModelError(f"FT target {name!r}: {err}") from err

    def block_of(self, model: nn.Module, module_name: str) -> int:
        """Index of the transformer block that holds ``module_name``."""
        layers = self.layout(model).layers
        head, _, rest = module_name.partition(layers + ".")
        index = rest.split(".", 1)[0]
        if head or not index.isdigit() or "." not in rest:
            raise UnsupportedModelError(
                f"FT fine-tunes projections inside the transformer blocks ({layers}.<i>....); "
                f"target {module_name!r} is not inside one."
            )
        return int(index)

    def choose_target_modules(self, model: nn.Module) -> list[str]:
        layout = self.layout(model)
        depth = num_layers(model, layout)
        if self.layers is None:
            self.layers = [default_edit_layer(depth)]
        too_deep = [i for i in self.layers if i >= depth]
        if too_deep:
            raise UnsupportedModelError(
                f"FTConfig.layers={self.layers}, but the model has only {depth} blocks."
            )
        return [mlp_out_name(layout, i) for i in self.layers]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
