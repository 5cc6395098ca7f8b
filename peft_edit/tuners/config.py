"""What every edit adapter's config holds, whatever the method: targets, ledger, fingerprints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig
from torch import nn

from ..architectures import Layout, get_layout
from ..requests import EditRequest

# Keys the ledger adds to a request's fields.
LEDGER_ANNOTATIONS = ("replaced_by",)


def request_from_ledger(fields: dict[str, Any]) -> EditRequest:
    return EditRequest.from_dict({k: v for k, v in fields.items() if k not in LEDGER_ANNOTATIONS})


@dataclass
class EditConfig(PeftConfig):
    """Base class of the edit adapter configs (``RomeConfig``, ...).

    Subclasses set ``method`` (the registered adapter name) and implement
    :meth:`choose_target_modules`. Everything that varies in size with the number of edits is
    recorded here, so that loading can build the modules before the weights arrive.
    """

    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Full names of the modules the edits change. Left empty, the method chooses them from the model."
        },
    )
    layers_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the transformer block list (e.g. 'model.layers'), for models peft-edit does not know."
        },
    )
    mlp_out_path: str | None = field(
        default=None,
        metadata={
            "help": "Path of the MLP output projection inside a block (e.g. 'mlp.down_proj'), for unknown models."
        },
    )
    edits: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": "The ledger: one entry per edit the adapter holds (the request and where it is stored)."
        },
    )
    base_fingerprints: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Hash of each targeted base weight the edits were computed against."},
    )
    verify_base_weights: bool = field(
        default=True,
        metadata={
            "help": "Refuse to apply the adapter to weights that differ from those it was computed against."
        },
    )

    method = "edit"  # class attribute: the name the method is registered under

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = self.peft_type_member()
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"

    @classmethod
    def peft_type_member(cls):
        from peft.utils import PeftType

        return getattr(PeftType, cls.method.upper())

    # ----------------------------------------------------------- resolution
    def layout(self, model: nn.Module) -> Layout:
        return get_layout(model, layers_path=self.layers_path, mlp_out_path=self.mlp_out_path)

    def resolve(self, model: nn.Module) -> None:
        """Fill what was left to the method (the target modules), checking them against ``model``."""
        if not self.target_modules:
            self.target_modules = self.choose_target_modules(model)
        names = {name for name, _ in model.named_modules()}
        missing = [t for t in self.target_modules if t not in names]
        if missing:
            raise ValueError(f"target_modules {missing} are not modules of {type(model).__name__}.")

    def choose_target_modules(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    # ---------------------------------------------------------------- ledger
    def module_rank(self, module_name: str) -> int:
        """Total rank the ledger assigns to ``module_name`` (derived, never stored twice)."""
        return max(
            (entry["modules"][module_name][1] for entry in self.edits if module_name in entry["modules"]),
            default=0,
        )

    def requests(self, include_replaced: bool = True) -> list[EditRequest]:
        """The requests this adapter holds, oldest first; ``include_replaced=False`` leaves out those a
        later, contradicting request replaced."""
        return [
            request_from_ledger(r)
            for entry in self.edits
            for r in entry["requests"]
            if include_replaced or "replaced_by" not in r
        ]
