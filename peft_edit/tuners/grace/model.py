"""GRACE as an edit adapter: a codebook of keys, values and radii at one MLP, grown one edit at a time."""

from __future__ import annotations

import weakref

import torch

from ...requests import EditRequest, pad_token_id, tokenize_continuation
from ..site_training import cached_token_site_inputs, remember_token_site_inputs
from ..wrapped import WrappedTuner
from .algorithm import optimise_value, teacher_forced_ids
from .bystanders import BystanderBank
from .config import GraceConfig
from .layer import GraceLayer, Placement, clear_radius, target_label

# Per tokenizer: (prompt ids, target ids) of each (prompt, target) seen. Every edit re-reads the whole
# ledger (bystanders, refits), and tokenizing hundreds of passages twice per edit adds up.
_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Per GRACE layer and adapter: the bystander keys of the ledger's rows (see BystanderBank).
_BANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def request_row(tokenizer, request: EditRequest) -> tuple[list[int], list[int]]:
    """:func:`tokenize_continuation` of ``request``'s prompt and new target, remembered per tokenizer."""
    rows = _ROWS.setdefault(tokenizer, {})
    key = (request.filled_prompt, request.target_new)
    if key not in rows:
        rows[key] = tokenize_continuation(tokenizer, *key)
    prompt, target = rows[key]
    return list(prompt), list(target)  # copies: the remembered ids stay as tokenized


def block_index(layers_path: str, module_name: str) -> int:
    """Index of the block that holds ``module_name`` (e.g. 24 for ``model.layers.24.mlp``)."""
    head = layers_path + "."
    index = module_name[len(head) :].split(".")[0] if module_name.startswith(head) else ""
    if not index.isdigit():
        raise ValueError(
            f"GRACE's target module {module_name!r} is not inside a block of {layers_path!r}; give a "
            "module inside one block (e.g. 'model.layers.24.mlp') or set GraceConfig.layer instead."
        )
    return int(index)


class GraceTuner(WrappedTuner):
    prefix = "grace_"
    tuner_layer_cls = GraceLayer

    def compute_edit(self, config: GraceConfig, requests, tokenizer):
        (request,) = requests
        (name,) = config.target_modules
        layer = self._layer(name)
        adapter = next(n for n, c in self.peft_config.items() if c is config)
        layout = config.layout(self.model)
        block = block_index(layout.layers, name)
        pad_id = pad_token_id(tokenizer)
        row = request_row(tokenizer, request)

        label = target_label(request.target_new)
        found = self._optimise(layout, block, layer, [row], pad_id, config)
        key = found.keys[0]
        norm = float(key.norm())
        # The value was optimised with every other position of the row left alone, so no entry may
        # reach those positions, of this row or of an earlier edit's (see GraceLayer.keep_clear_of).
        bystanders = self._bystander_keys(block, layer, [row], pad_id)
        earlier = self._ledger_bank(config, adapter, name, block, layer, tokenizer, config.edits)
        tolerance = config.replace_tolerance

        def clear_of_bystanders(key: torch.Tensor) -> float:
            return min(clear_radius(key, bystanders, tolerance), earlier.clear_distance(key, tolerance))

        radius = min(config.init_radius * norm, clear_of_bystanders(key))
        placement = layer.placement(adapter, key, label, radius, config.replace_tolerance * norm)
        if placement.action == "expand":
            stored = layer.entry(adapter, placement.index)["key"]
            if placement.distance + placement.margin > clear_of_bystanders(stored):
                # Widening the stored ball to this key would take in a bystander: a ball of its own instead.
                placement = Placement("add", None, placement.distance)
        if placement.action == "expand":
            # The stored value is shared: optimise it again so it serves the prompts it was made for
            # and this one too (rarer than a new entry, so the first optimisation is not avoided).
            shared = self.prompts_of_entry(config, name, placement.index, label)
            rows = [row] + [request_row(tokenizer, r) for r in shared]
            start = layer.entry(adapter, placement.index)["value"]
            found = self._optimise(layout, block, layer, rows, pad_id, config, start=start)
        return {name: (placement, key, found.value, radius, label, bystanders, tolerance)}

    def after_append(self, config: GraceConfig, adapter_name: str, entry: dict, tokenizer) -> None:
        """Optimise again the values of earlier edits whose rows the new entry now answers in.

        No radius reaches another position of an edited row, except where that row holds the very
        text of the new edit's prompt (a passage corrected sentence by sentence: one edit's prompt
        begins another's). There the new entry answers, as it should, and an earlier value,
        optimised without it, now works in another context. Each such value is optimised again
        from where it stands (no step at all when its target still holds). One level only: a value
        changed here is not chased into the rows that contain its own prompt.
        """
        (name,) = config.target_modules
        layer = self._layer(name)
        new_index = entry["modules"][name][0]
        key = layer.grace_keys[adapter_name][new_index]
        layout = config.layout(self.model)
        block = block_index(layout.layers, name)
        pad_id = pad_token_id(tokenizer)
        earlier = self._ledger_bank(config, adapter_name, name, block, layer, tokenizer, config.edits[:-1])
        in_context = earlier.in_context(key, config.replace_tolerance)
        indices = [entry["modules"].get(name, [None])[0] for entry in config.edits[:-1]]
        # The new entry's own requests (a replaced entry's included) were just optimised with it.
        touched = {
            indices[position]
            for position in earlier.owners[in_context].unique().tolist()
            if indices[position] is not None and indices[position] != new_index
        }
        for index in sorted(touched):
            stored = layer.entry(adapter_name, index)
            shared = self.prompts_of_entry(config, name, index, stored["label"])
            rows = [request_row(tokenizer, r) for r in shared]
            found = self._optimise(layout, block, layer, rows, pad_id, config, start=stored["value"])
            with torch.no_grad():
                layer.grace_values[adapter_name][index] = found.value

    def _optimise(
        self, layout, block: int, layer: GraceLayer, rows, pad_id: int, config: GraceConfig, start=None
    ):
        """:func:`optimise_value`; its forward passes read the rows' keys at every token on the way, which
        are remembered for :meth:`_bystander_keys` (the same rows, run again otherwise)."""
        found = optimise_value(self.model, layout, block, layer, rows, pad_id, config, start=start)
        remember_token_site_inputs(self.model, block, teacher_forced_ids(rows), found.token_keys)
        return found

    def _ledger_bank(
        self, config: GraceConfig, adapter: str, name: str, block: int, layer: GraceLayer, tokenizer, entries
    ) -> BystanderBank:
        """The adapter's :class:`BystanderBank`, brought to the bystander keys (:meth:`_bystander_keys`) of
        the requests of ``entries`` (ledger entries, in order) that no later edit replaced, each owned
        by its entry's position."""
        pad_id = pad_token_id(tokenizer)
        blocks = []
        for position, entry in enumerate(entries):
            requests = [EditRequest.from_dict(r) for r in entry["requests"] if "replaced_by" not in r]
            rows = [request_row(tokenizer, r) for r in requests]
            parts = self._bystander_keys(block, layer, rows, pad_id) if rows else []
            labels = [(position, tuple(prompt), tuple(target), half) for prompt, target in rows for half in (0, 1)]
            blocks.extend((label, position, keys) for label, keys in zip(labels, parts, strict=True))
        bank = _BANKS.setdefault(layer, {}).setdefault(adapter, BystanderBank())
        bank.sync(blocks)
        return bank

    def _bystander_keys(self, block: int, layer: GraceLayer, rows, pad_id: int) -> list[torch.Tensor]:
        """The codebook module's inputs, in rows (prompt ids, target ids), at every position the value
        was not optimised for, i.e. all of prompt + target but the prompt's last token: per row two
        views (before and after that token) of the remembered keys, so that nothing is copied."""
        keys = cached_token_site_inputs(self.model, block, layer, teacher_forced_ids(rows), pad_id)
        return [
            part
            for row_keys, (prompt, _) in zip(keys, rows)
            for part in (row_keys[: len(prompt) - 1], row_keys[len(prompt) :])
        ]

    @staticmethod
    def prompts_of_entry(config: GraceConfig, module_name: str, index: int, label: int):
        """The requests entry ``index`` answers: those stored in it with the same target."""
        return [
            request
            for entry in config.edits
            if entry["modules"].get(module_name) == [index, index + 1]
            for request in map(EditRequest.from_dict, entry["requests"])
            if target_label(request.target_new) == label
        ]

    def codebook(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """A copy of the codebook (``keys``, ``values``, ``radii``, ``labels``) of the adapter's one GRACE layer."""
        adapter_name = self._active_adapter_name(adapter_name)
        (name,) = self.peft_config[adapter_name].target_modules
        layer = self._layer(name)
        return {
            "keys": layer.grace_keys[adapter_name].detach().clone(),
            "values": layer.grace_values[adapter_name].detach().clone(),
            "radii": layer.grace_radii[adapter_name].detach().clone(),
            "labels": layer.grace_labels[adapter_name].detach().clone(),
        }
