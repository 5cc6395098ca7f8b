"""GRACE as an edit adapter: a codebook of keys, values and radii at one MLP, grown one edit at a time."""

from __future__ import annotations

import torch

from ...requests import EditRequest, pad_token_id, tokenize_continuation
from ..wrapped import WrappedTuner
from .algorithm import optimise_value
from .config import GraceConfig
from .layer import GraceLayer, target_label


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
        row = tokenize_continuation(tokenizer, request.filled_prompt, request.target_new)

        label = target_label(request.target_new)
        found = optimise_value(self.model, layout, block, layer, [row], pad_id, config)
        key = found.keys[0]
        norm = float(key.norm())
        radius = config.init_radius * norm
        placement = layer.placement(adapter, key, label, radius, config.replace_tolerance * norm)
        if placement.action == "expand":
            # The stored value is shared: optimise it again so it serves the prompts it was made for
            # and this one too (rarer than a new entry, so the first optimisation is not avoided).
            shared = self.prompts_of_entry(config, name, placement.index, label)
            rows = [row] + [tokenize_continuation(tokenizer, r.filled_prompt, r.target_new) for r in shared]
            start = layer.entry(adapter, placement.index)["value"]
            found = optimise_value(self.model, layout, block, layer, rows, pad_id, config, start=start)
        return {name: (placement, key, found.value, radius, label)}

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
