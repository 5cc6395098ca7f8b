"""What the configs of the wrapping methods share: the one block they wrap, and how they train there.

:class:`OneBlockConfig` (GRACE, WISE, T-Patcher): a ``layer`` field, its default from the model's
depth, and the check that the model has that block. :class:`SiteTrainingConfig` (WISE,
T-Patcher) adds what :mod:`peft_edit.tuners.site_training` needs: steps, learning rate, early
stop, the sampled prefixes and the unrelated texts the new memory must stay silent on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...architectures import Layout, UnsupportedModelError, mlp_out_name, num_layers
from ..config import EditConfig


@dataclass
class OneBlockConfig(EditConfig):
    layer: int | None = field(
        default=None, metadata={"help": "Block whose module is wrapped; default: the method's own depth."}
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
