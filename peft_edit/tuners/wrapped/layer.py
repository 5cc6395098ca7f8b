"""The layer base of edit adapters that wrap a module and leave its weights alone.

GRACE, WISE and T-Patcher keep the base weights and put memory or patch modules beside one
module: the wrapper runs the module, then changes its output. Such an edit is no weight delta,
so it cannot be merged, and switching the adapter off or unloading it gives the original module
back untouched.

How a method plugs in (GRACE in ``peft_edit/tuners/grace/`` is a complete example):

1. Subclass :class:`WrappedLayer`:

   * ``adapter_layer_names``: the names of the ``nn.ParameterDict`` attributes that hold
     per-adapter floating-point state, and ``other_param_names`` those of peft's ``BufferDict``
     attributes for state that is not (integer labels); peft saves, loads and moves both, and
     :meth:`snapshot` copies both;
   * ``method_title`` and ``storage`` (used in the merge error: "GRACE edits live in a codebook
     beside the weights ...");
   * :meth:`create_adapter_state` ``(adapter_name, size)``: build empty state of ``size``
     entries (loading calls it with the size the ledger gives, before the weights arrive);
   * :meth:`size` ``(adapter_name)``: the number of entries held;
   * :meth:`apply` ``(adapter_name, x, output)``: the edited output, given the module's input
     ``x`` and its unedited ``output``;
   * ``append(adapter_name, *payload) -> (start, stop)``: store one edit (what the tuner's
     ``compute_edit`` returned for this module) and return the slice of entries it occupies;
     an edit may also change earlier entries in place, since ``edit()`` rolls back by
     :meth:`snapshot` / :meth:`restore`, which copy the whole state.

2. Subclass :class:`~peft_edit.tuners.wrapped.model.WrappedTuner` with ``prefix``,
   ``tuner_layer_cls`` and ``compute_edit`` (see :class:`~peft_edit.tuners.tuner.EditTuner`),
   and an :class:`~peft_edit.tuners.config.EditConfig` subclass with
   ``choose_target_modules``; register both with ``peft_edit.register_edit_method``.

While an edit is computed, ``with layer.bypassed():`` gives the wrapped module's own output, so
a method can read the original activations at a position its memory already covers.
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class CannotMergeError(TypeError):
    """The adapter keeps its edits beside the weights; there is no weight delta to merge."""


class WrappedLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    method_title = "These"
    storage = "memory modules"

    def __init__(self, base_layer: nn.Module, adapter_name: str, size: int) -> None:
        super().__init__()
        BaseTunerLayer.__init__(self)
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self._bypass = False
        self.update_layer(adapter_name, size)

    # ----------------------------------------------------------- to implement
    def create_adapter_state(self, adapter_name: str, size: int) -> None:
        raise NotImplementedError

    def size(self, adapter_name: str) -> int:
        raise NotImplementedError

    def apply(self, adapter_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------- state
    def update_layer(self, adapter_name: str, size: int) -> None:
        self.create_adapter_state(adapter_name, size)
        self.set_adapter(self.active_adapters)

    def state_factory(self) -> dict:
        """``device`` and floating ``dtype`` for new state: those of the wrapped module's parameters."""
        reference = next(self.base_layer.parameters(), None)
        if reference is None:
            return {"device": torch.device("cpu"), "dtype": torch.float32}
        dtype = reference.dtype if reference.is_floating_point() else torch.float32
        return {"device": reference.device, "dtype": dtype}

    def snapshot(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """A copy of the adapter's whole state: :meth:`restore` undoes any later change, in place or not."""
        return {
            attr: getattr(self, attr)[adapter_name].detach().clone()
            for attr in self.adapter_layer_names + self.other_param_names
            if adapter_name in getattr(self, attr)
        }

    @torch.no_grad()
    def restore(self, adapter_name: str, snapshot: dict[str, torch.Tensor]) -> None:
        for attr, tensor in snapshot.items():
            container = getattr(self, attr)
            if isinstance(container, nn.ParameterDict):
                container[adapter_name] = nn.Parameter(tensor.clone(), requires_grad=False)
            else:
                container[adapter_name] = tensor.clone()

    @contextlib.contextmanager
    def bypassed(self):
        """Inside, the layer returns the wrapped module's own output (its memory switched off)."""
        previous, self._bypass = self._bypass, True
        try:
            yield self
        finally:
            self._bypass = previous

    # ---------------------------------------------------------------- merging
    @classmethod
    def cannot_merge_message(cls) -> str:
        return (
            f"{cls.method_title} edits live in {cls.storage} beside the weights and cannot be merged into "
            "them; use the adapter as it is, or unload_edits() for the original model."
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise CannotMergeError(self.cannot_merge_message())

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo (``unload_edits`` calls this)."""

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise CannotMergeError(self.cannot_merge_message())

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        output = self.base_layer(*args, **kwargs)
        if self.disable_adapters or self._bypass:
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        for name in self.active_adapters:
            if name in self._adapter_names() and self.size(name) > 0:
                output = self.apply(name, x, output)
        return output

    def _adapter_names(self) -> set[str]:
        return set(getattr(self, self.adapter_layer_names[0]))

    def __repr__(self) -> str:
        return f"{self.method_title.lower()}." + super().__repr__()
