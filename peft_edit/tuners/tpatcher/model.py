"""T-Patcher as an edit adapter: trained patch neurons per edit, one per target token."""

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
from .algorithm import (
    activation_loss,
    as_plain_neurons,
    initial_patch,
    key_directions,
    memory_loss,
    patch_activation,
)
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
        # One patch per target token: a patch adds one value vector, which can push one token only.
        own = rows.predicting_mask_per_token()  # (patches, rows, T)
        predicting = own.any(0)
        earlier = [EditRequest.from_dict(r) for e in config.edits for r in e["requests"]][-MAX_OTHER_EDITS:]
        texts = list(config.unrelated_texts or UNRELATED_TEXTS) + [r.filled_prompt for r in earlier]
        memory_per_text = cached_site_inputs(self.model, config.layer, layer, tokenizer, texts)
        memory = torch.cat(memory_per_text)
        row_keys = self._row_keys(layer, rows)
        # A text's first key is an outlier (~10x the norm of the others on SmolLM2: the attention
        # sink); it stays in the memory loss but would dominate the memory's mean and moment.
        typical = torch.cat([k[1:] for k in memory_per_text])
        moments = second_moments(self.model, tokenizer, config, [config.layer])
        moment = moments[config.layer] if moments else typical.T @ typical / len(typical)
        edit_key_sets = [row_keys[where] for where in own]
        start_directions = key_directions(edit_key_sets, typical, moment, config.key_ridge)
        starts = [
            initial_patch(keys, memory, direction, config.boundary)
            for keys, direction in zip(edit_key_sets, start_directions)
        ]

        d_in, d_out = in_out_features(layer.base_layer)
        directions = [s.direction.clone().requires_grad_(True) for s in starts]
        scales = torch.tensor([s.scale for s in starts], device=device)
        bias = torch.tensor([s.bias for s in starts], device=device, requires_grad=True)
        values = torch.zeros(len(starts), d_out, device=device, requires_grad=True)
        edit_keys = row_keys[predicting]
        # Units in which one Adam step of size lr moves a pre-activation, or a value's norm, by about lr.
        key_size = edit_keys.abs().sum(-1).mean().item()
        direction_groups = [
            {"params": [d], "lr": config.lr / (s.scale * key_size)} for d, s in zip(directions, starts)
        ]
        base = layer.get_base_layer()
        value_unit = base(edit_keys.to(base.weight.dtype)).float().norm(dim=-1).mean().item() / d_out**0.5
        state = {"fires_only_where_it_should": False}

        def pre_activation(keys):  # (..., in) -> (..., patches); one product reads the keys once
            return keys @ torch.stack(directions, -1) * scales + bias

        threshold = config.fire_threshold

        def added_output(x):
            return patch_activation(pre_activation(x), threshold) @ (values * value_unit)

        def patch_losses(x, _added):
            pre = pre_activation(x)
            fire = torch.stack([activation_loss(pre[..., j][where]) for j, where in enumerate(own)]).mean()
            # Silent on the memory, and each patch also where the edit predicts its other tokens.
            elsewhere = [pre[..., j][predicting & ~where] for j, where in enumerate(own)]
            silent = memory_loss(torch.cat([pre_activation(memory).flatten(), *elsewhere]))
            # A hinge averaging below 1e-3 means a handful of keys inside the margin, not on the wrong side.
            state["fires_only_where_it_should"] = fire.item() < 1e-3 and silent.item() < 1e-3
            return config.activation_weight * fire + config.memory_weight * silent

        train_added_output(
            self.model,
            config.layout(self.model),
            config.layer,
            layer,
            rows,
            [*direction_groups, {"params": [bias], "lr": config.lr}, {"params": [values], "lr": config.lr}],
            added_output=added_output,
            extra_loss=patch_losses,
            steps=config.num_steps,
            lr=config.lr,
            early_stop_loss=config.early_stop_loss,
            done=lambda: state["fires_only_where_it_should"],
            compute_dtype=config.torch_compute_dtype,
        )
        with torch.no_grad():
            keys, biases = as_plain_neurons(torch.stack(directions) * scales[:, None], bias, threshold)
            return {target: (keys, biases, (values * value_unit).detach())}

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
