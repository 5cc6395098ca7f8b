"""The peft tuner shared by every edit method: targets, fingerprints, the ledger, ``edit`` and ``unload_edits``.

A method subclass supplies how an edit is computed (:meth:`EditTuner.compute_edit`) and, through
its layer class, how it is stored. Everything reachable from a user's ``PeftModel`` (``edit``,
``unload_edits``, ``ledger``) is defined here once, so it works the same whether the model came
from :func:`peft_edit.get_edited_model` or from ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from ..fingerprint import BaseWeightsMismatchError, weight_fingerprint
from ..requests import EditRequest, as_requests, check_requests_tokenize
from .config import EditConfig, request_from_ledger


def _base_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    # A wrapper around a whole module (an MLP, a block) fingerprints all its parameters.
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _check_no_contradiction_within(requests: list[EditRequest]) -> None:
    targets: dict[tuple[str, str], str] = {}
    for r in requests:
        if targets.setdefault(r.fact, r.target_new) != r.target_new:
            raise ValueError(
                f"Two requests in one call give {r.filled_prompt!r} different targets "
                f"({targets[r.fact]!r} and {r.target_new!r}); keep one, or edit them in separate calls "
                "(a later call replaces the earlier target)."
            )


class EditTuner(BaseTuner):
    """Base tuner: subclasses set ``prefix``, ``tuner_layer_cls`` and implement the edit maths."""

    target_module_mapping: dict[str, list[str]] = {}
    # How many requests one call of compute_edit receives (ROME: one at a time; MEMIT: a batch).
    requests_per_step: int | None = 1

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage=False, state_dict=None) -> None:
        self._tokenizer = None
        super().__init__(
            model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
        )

    # ------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: EditConfig, model_config: dict) -> EditConfig:
        return peft_config  # targets are resolved against the model itself, in _pre_injection_hook

    @staticmethod
    def _check_target_module_exists(peft_config: EditConfig, key: str) -> bool:
        return key in (peft_config.target_modules or ())

    def _pre_injection_hook(self, model: nn.Module, config: EditConfig, adapter_name: str) -> None:
        # Every check runs here, before the first module is replaced, so a failure leaves the model as it was.
        config.resolve(model)
        self._check_fingerprints(model, config)

    @staticmethod
    def _check_fingerprints(model: nn.Module, config: EditConfig) -> None:
        current = {
            name: weight_fingerprint(_base_weight(model.get_submodule(name)))
            for name in config.target_modules
        }
        if not config.base_fingerprints:
            config.base_fingerprints = current  # a new adapter: remember what it is computed against
            return
        changed = sorted(n for n in config.target_modules if config.base_fingerprints.get(n) != current[n])
        if changed and config.verify_base_weights:
            raise BaseWeightsMismatchError(
                f"This edit adapter was computed against different weights for {changed} "
                f"(recorded for base model {config.base_model_name_or_path!r}). Applied to other weights the edits "
                "would do something else. Load it onto the model it was made for; to apply it anyway, pass "
                "`verify_base_weights=False` to peft_edit.load_edited_model (or set it on the loaded config)."
            )

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key=None, **kw
    ):
        rank = peft_config.module_rank(current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, rank)
            return
        new_module = self.tuner_layer_cls(target, adapter_name, rank)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # Edits are computed in closed form or by their own optimisation, never by a trainer.
        for p in model.parameters():
            p.requires_grad = False

    # ----------------------------------------------------------------- edits
    def compute_edit(self, config: EditConfig, requests: list[EditRequest], tokenizer) -> dict[str, Any]:
        """Return ``{module_name: payload}`` for the layer class's ``append``; the model is as edited so far.

        A layer class implements ``append(adapter, *payload) -> (start, stop)`` (the slice of its
        size the edit occupies, recorded in the ledger; loading builds each layer at the size the
        ledger gives), ``snapshot(adapter)`` and ``restore(adapter, snapshot)`` (a failed ``edit``
        call is undone with them).
        """
        raise NotImplementedError

    def after_append(self, config: EditConfig, adapter_name: str, entry: dict[str, Any], tokenizer) -> None:
        """Called once ``entry`` is stored and in the ledger: a method may adjust earlier edits to it.

        Only state that the layers' ``snapshot`` covers may change (a failed ``edit`` restores it).
        """

    def _active_adapter_name(self, adapter_name: str | None) -> str:
        if adapter_name is not None:
            if adapter_name not in self.peft_config:
                raise ValueError(
                    f"No adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}."
                )
            return adapter_name
        if len(self.active_adapters) != 1:
            raise ValueError(
                f"Several adapters are active ({self.active_adapters}); say which to edit with adapter_name=."
            )
        return self.active_adapters[0]

    def edit(
        self,
        requests: EditRequest | dict | list,
        tokenizer=None,
        adapter_name: str | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Write more edits into the adapter; returns their ledger entries.

        Either every request is stored or, if anything fails, none is: the adapter is rolled back to
        the edits it held before the call.
        """
        adapter_name = self._active_adapter_name(adapter_name)
        config: EditConfig = self.peft_config[adapter_name]
        requests = as_requests(requests)
        tokenizer = tokenizer if tokenizer is not None else self._tokenizer
        if tokenizer is None:
            raise ValueError(
                "Editing needs the model's tokenizer: pass tokenizer=... (it is remembered afterwards)."
            )
        check_requests_tokenize(tokenizer, requests)
        self._tokenizer = tokenizer
        if any(isinstance(m, BaseTunerLayer) and m.disable_adapters for m in self.model.modules()):
            raise RuntimeError(
                "Edits are computed on the edited model; enable the adapter before calling edit()."
            )

        _check_no_contradiction_within(requests)

        step = self.requests_per_step or len(requests)
        groups = [requests[i : i + step] for i in range(0, len(requests), step)]
        ledger_before = copy.deepcopy(config.edits)
        snapshots = {name: self._layer(name).snapshot(adapter_name) for name in config.target_modules}
        new_entries = []
        try:
            for group in tqdm(groups, desc=f"{config.method} edits", disable=not progress or len(groups) < 2):
                started = time.perf_counter()
                replaced = self._replace_contradicted(config, adapter_name, group)
                payloads = self.compute_edit(config, group, tokenizer)
                entry = {
                    "requests": [r.to_dict() for r in group],
                    "modules": {
                        name: list(self._layer(name).append(adapter_name, *p)) for name, p in payloads.items()
                    },
                    "seconds": round(time.perf_counter() - started, 3),
                }
                if replaced:
                    entry["replaces"] = replaced
                config.edits.append(entry)
                self.after_append(config, adapter_name, entry, tokenizer)
                new_entries.append(entry)
        except BaseException:
            # Back to the state before the call: the ledger and every targeted layer.
            config.edits[:] = ledger_before
            for name, snapshot in snapshots.items():
                self._layer(name).restore(adapter_name, snapshot)
            raise
        return new_entries

    def _replace_contradicted(self, config: EditConfig, adapter_name: str, group) -> list[dict[str, Any]]:
        """Retire held requests that ``group`` contradicts (same fact, other target); return the ledger note.

        A retired request is marked ``replaced_by`` (the index of the entry about to be added) and,
        where the method can, its stored edit is removed first (:meth:`forget`), so the new edit is
        computed against the unedited fact instead of fighting the old one.
        """
        new_targets = {r.fact: r.target_new for r in group}
        replaced = []
        for e, entry in enumerate(config.edits):
            for j, held in enumerate(entry["requests"]):
                if "replaced_by" in held:
                    continue
                request = request_from_ledger(held)
                target = new_targets.get(request.fact)
                if target is None or target == request.target_new:
                    continue
                removed = self.forget(adapter_name, entry, j)
                held["replaced_by"] = len(config.edits)
                replaced.append({"entry": e, "request": j, "target_new": request.target_new, "removed": removed})
        return replaced

    def forget(self, adapter_name: str, entry: dict[str, Any], request_index: int) -> bool:
        """Remove request ``request_index`` of ledger ``entry`` from the stored edits, if the method can.

        Returns whether it did; the default keeps the stored edit (the new one then overrides it).
        Must not modify stored tensors in place (a failed ``edit`` call restores snapshots).
        """
        return False

    def _layer(self, module_name: str) -> nn.Module:
        layer = self.model.get_submodule(module_name)
        if not isinstance(layer, self.tuner_layer_cls):
            raise RuntimeError(f"{module_name} is not an edit layer; was the adapter unloaded?")
        return layer

    # ----------------------------------------------------------- inspection
    @property
    def ledger(self) -> list[dict[str, Any]]:
        """The active adapter's edits, oldest first (a copy)."""
        return copy.deepcopy(self.peft_config[self._active_adapter_name(None)].edits)

    def edited_requests(self, adapter_name: str | None = None) -> list[EditRequest]:
        return self.peft_config[self._active_adapter_name(adapter_name)].requests()

    # ------------------------------------------------------------- removal
    def unload_edits(self) -> nn.Module:
        """Remove every edit layer and return the original model, its weights bit-identical to before."""
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.unmerge()  # restores the exact pre-merge weights
        return self.unload()
