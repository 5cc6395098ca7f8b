"""What the configs of the wrapping methods share: the one block they wrap, and how they train there.

:class:`OneBlockConfig` (GRACE, WISE, T-Patcher): a ``layer`` field, its default from the model's
depth, the check that the model has that block, and the dtype an edit's optimisation may run
that block and those above it in. :class:`SiteTrainingConfig` (WISE,
T-Patcher) adds what :mod:`peft_edit.tuners.site_training` needs: steps, learning rate, early
stop, the sampled prefixes and the unrelated texts the new memory must stay silent on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...architectures import Layout, UnsupportedModelError, mlp_out_name, num_layers
from ..config import EditConfig

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class OneBlockConfig(EditConfig):
    layer: int | None = field(
        default=None, metadata={"help": "Block whose module is wrapped; default: the method's own depth."}
    )
    compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype the blocks from the wrapped one up run in while an edit is optimised ('bfloat16', "
            "'float16'); None: the model's own. Their matrix products are nearly all of each step, and "
            "bfloat16 runs them about twice as fast on GPUs and on CPUs with bfloat16 instructions "
            "(AVX512-BF16, AMX). Keys are read and the stop rule is confirmed at the model's own precision."
        },
    )

    def default_layer(self, depth: int) -> int:
        """The block used when ``layer`` is None, for a model of ``depth`` blocks."""
        raise NotImplementedError

    def site_name(self, layout: Layout, layer: int) -> str:
        """The module wrapped in block ``layer`` (default: the MLP's output projection)."""
        return mlp_out_name(layout, layer)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"{type(self).__name__}.layer must be >= 0, got {self.layer}.")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"{type(self).__name__}.compute_dtype must be one of {COMPUTE_DTYPES} or None, "
                f"got {self.compute_dtype!r}."
            )

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        """:attr:`compute_dtype` as a torch dtype (None: the model's own)."""
        return getattr(torch, self.compute_dtype) if self.compute_dtype else None

    def choose_target_modules(self, model: nn.Module) -> list[str]:
        layout = self.layout(model)
        depth = num_layers(model, layout)
        if self.layer is None:
            self.layer = self.default_layer(depth)
        if self.layer >= depth:
            raise UnsupportedModelError(
                f"{type(self).__name__}.layer={self.layer}, but the model has only {depth} blocks."
            )
        return [self.site_name(layout, self.layer)]


@dataclass
class SiteTrainingConfig(OneBlockConfig):
    num_steps: int = field(default=25, metadata={"help": "Optimisation steps per edit."})
    lr: float = field(default=0.1, metadata={"help": "Learning rate of the trained memory."})
    early_stop_loss: float = field(
        default=0.05,
        metadata={
            "help": "Stop once the target's NLL is below this and the memory fires only where it should."
        },
    )
    context_template_lengths: list[int] = field(
        default_factory=lambda: [5, 10], metadata={"help": "Token lengths of the sampled prefixes."}
    )
    context_templates_per_length: int = field(
        default=2, metadata={"help": "Sampled prefixes per length (plus the bare prompt)."}
    )
    unrelated_texts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Texts the new memory must not fire on; default: a built-in set of everyday sentences."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampled prefixes (and WISE's shard masks)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_steps < 1 or self.lr <= 0:
            raise ValueError(f"{type(self).__name__}.num_steps must be at least 1 and lr positive.")
