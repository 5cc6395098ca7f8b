"""The tuner base of edit adapters that wrap modules (GRACE, WISE, T-Patcher, ...).

What these methods share beyond :class:`~peft_edit.tuners.tuner.EditTuner`: the wrapper replaces
a module that may have no ``.weight`` of its own (peft's ``_replace_module`` assumes one), and
merging is refused before anything is touched, with a message that says what to do instead.
"""

from __future__ import annotations

from torch import nn

from ..tuner import EditTuner
from .layer import CannotMergeError, WrappedLayer


class WrappedTuner(EditTuner):
    tuner_layer_cls = WrappedLayer

    def _replace_module(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
    ) -> None:
        setattr(parent, child_name, new_module)
        if isinstance(new_module, WrappedLayer):
            # The memory lives on the device of the module it wraps.
            reference = next(child.parameters(), None)
            if reference is not None:
                for attr in new_module.adapter_layer_names + new_module.other_param_names:
                    getattr(new_module, attr).to(reference.device)

    def _check_merge_allowed(self) -> None:
        # Refused before the first layer is visited, so a failed merge_and_unload leaves the model as it was.
        raise CannotMergeError(self.tuner_layer_cls.cannot_merge_message())
