"""T-Patcher's hyperparameters; every one has a default that works without per-model settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...architectures import UnsupportedModelError, mlp_out_name, num_layers
from ..config import EditConfig


@dataclass
class TPatcherConfig(EditConfig):
    """Transformer-Patcher (Huang et al., 2023): one patch neuron per edit beside a late MLP.

    A patch is a key ``k``, a bias ``b`` and a value ``v``; at every token it adds
    ``relu(k·x + b) v`` to the MLP's output, where ``x`` is the input of the MLP's output
    projection. It is trained to fire on the edit (pre-activation at least 1 where the target is
    predicted) and stay silent (at most -1) on keys of unrelated text and of earlier edits.
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
    boundary: float = field(
        default=0.5,
        metadata={
            "help": "Where a new patch starts to fire, between the memory's closest key (0) and the edit's (1); "
            "higher is more specific."
        },
    )
    activation_weight: float = field(
        default=1.0, metadata={"help": "Weight of the activation loss (the patch must fire on the edit)."}
    )
    memory_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the memory loss (the patch must stay silent on other text)."},
    )
    early_stop_loss: float = field(
        default=0.05,
        metadata={
            "help": "Stop once the target's NLL is below this and the patch fires only where it should."
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
            "help": "Texts whose keys form the memory patches must not fire on; default: a built-in set."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampled prefixes."})

    method = "tpatcher"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"TPatcherConfig.layer must be >= 0, got {self.layer}.")
        if self.num_steps < 1 or self.lr <= 0:
            raise ValueError("TPatcherConfig.num_steps must be at least 1 and lr positive.")
        if not 0 < self.boundary < 1:
            raise ValueError(f"TPatcherConfig.boundary must be in (0, 1), got {self.boundary}.")
        if self.activation_weight < 0 or self.memory_weight < 0:
            raise ValueError("TPatcherConfig.activation_weight and memory_weight must be >= 0.")

    def choose_target_modules(self, model: nn.Module) -> list[str]:
        layout = self.layout(model)
        depth = num_layers(model, layout)
        if self.layer is None:
            self.layer = depth - 1
        if self.layer >= depth:
            raise UnsupportedModelError(
                f"TPatcherConfig.layer={self.layer}, but the model has only {depth} blocks."
            )
        return [mlp_out_name(layout, self.layer)]
