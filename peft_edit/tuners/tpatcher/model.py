"""T-Patcher as an edit adapter: one trained patch neuron per edit."""

from __future__ import annotations

import torch

from ...architectures import in_out_features
from ...capture import capture
from ...requests import EditRequest
from ..per_model import context_templates, second_moments
from ..site_training import (
    UNRELATED_TEXTS,
    build_target_rows,
    cached_site_inputs,
    train_added_output,
)
from ..wrapped import WrappedTuner
from .algorithm import activation_loss, initial_patch, key_direction, memory_loss
from .config import TPatcherConfig
from .layer import TPatcherLayer

# Earlier edits whose prompts a new patch must stay silent on (the most recent ones).
MAX_OTHER_EDITS = 200


class TPatcherTuner(WrappedTuner):
    prefix = "tpatcher_"
    tuner_layer_cls = TPatcherLayer

    def compute_edit(self, config: TPatcherConfig, requests, tokenizer):
        (request,) = requests
        (target,) = config.target_modules
        layer: TPatcherLayer = self._layer(target)
        device = next(self.model.parameters()).device

        templates = context_templates(self.model, tokenizer, config)
        rows = build_target_rows(tokenizer, [request], templates, device=device)
        predicting = rows.predicting_mask()
        earlier = [EditRequest.from_dict(r) for e in config.edits for r in e["requests"]][-MAX_OTHER_EDITS:]
        texts = list(config.unrelated_texts or UNRELATED_TEXTS) + [r.filled_prompt for r in earlier]
        memory_per_text = cached_site_inputs(self.model, config.layer, layer, tokenizer, texts)
        memory = torch.cat(memory_per_text)
        edit_keys = self._row_keys(layer, rows)[predicting]
        # A text's first key is an outlier (~10x the norm of the others on SmolLM2: the attention
        # sink); it stays in the memory loss but would dominate the memory's mean and moment.
        typical = torch.cat([k[1:] for k in memory_per_text])
        moments = second_moments(self.model, tokenizer, config, [config.layer])
        moment = moments[config.layer] if moments else typical.T @ typical / len(typical)
        direction = key_direction(edit_keys, typical, moment, config.key_ridge)
        start = initial_patch(edit_keys, memory, direction, config.boundary)

        d_in, d_out = in_out_features(layer.base_layer)
        direction = start.direction.clone().requires_grad_(True)
        bias = torch.tensor(start.bias, device=device, requires_grad=True)
        value = torch.zeros(d_out, device=device, requires_grad=True)
        # Units in which one Adam step of size lr moves a pre-activation, or the value's norm, by about lr.
        direction_lr = config.lr / (start.scale * edit_keys.abs().sum(-1).mean().item())
        value_unit = (
            layer.get_base_layer()(edit_keys.to(layer.get_base_layer().weight.dtype))
            .float()
            .norm(dim=-1)
            .mean()
            .item()
        )
        value_unit /= d_out**0.5
        state = {"fires_only_where_it_should": False}

        def pre_activation(keys):
            return start.scale * (keys @ direction) + bias

        def added_output(x):
            return torch.relu(pre_activation(x))[..., None] * (value * value_unit)

        def patch_losses(x, _added):
            fire = activation_loss(pre_activation(x[predicting]))
            silent = memory_loss(pre_activation(memory))
            # A hinge averaging below 1e-3 means a handful of keys inside the margin, not on the wrong side.
            state["fires_only_where_it_should"] = fire.item() < 1e-3 and silent.item() < 1e-3
            return config.activation_weight * fire + config.memory_weight * silent

        train_added_output(
            self.model,
            config.layout(self.model),
            config.layer,
            layer,
            rows,
            [
                {"params": [direction], "lr": direction_lr},
                {"params": [bias], "lr": config.lr},
                {"params": [value], "lr": config.lr},
            ],
            added_output=added_output,
            extra_loss=patch_losses,
            steps=config.num_steps,
            lr=config.lr,
            early_stop_loss=config.early_stop_loss,
            done=lambda: state["fires_only_where_it_should"],
        )
        with torch.no_grad():
            key = start.scale * direction
            return {target: (key.detach(), bias.detach(), (value * value_unit).detach())}

    def _row_keys(self, layer, rows) -> torch.Tensor:
        """The patched projection's input in the training rows, (rows, T, in)."""
        batch = rows.batch
        with torch.no_grad():
            seen, _ = capture(
                lambda: self.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ),
                inputs={"keys": layer},
            )
        keys = seen["keys"]
        return keys.reshape(batch.input_ids.shape[0], -1, keys.shape[-1]).float()
