"""MEMIT as an edit adapter: a batch of edits is one low-rank (or dense) delta per edited MLP projection."""

from __future__ import annotations

from tqdm.auto import tqdm

from ...architectures import mlp_out_name
from ..delta.model import DeltaTuner
from ..per_model import context_templates, second_moments
from .algorithm import (
    RequestRows,
    compute_deltas,
    isotropic_covariance,
    least_squares_factors,
    spread_over_layers,
)
from .config import MemitConfig


class MemitTuner(DeltaTuner):
    prefix = "memit_"
    requests_per_step = None  # the whole batch of an edit() call is solved together

    def compute_edit(self, config: MemitConfig, requests, tokenizer):
        layout = config.layout(self.model)
        layers = list(config.layers)
        templates = context_templates(self.model, tokenizer, config)
        moments = second_moments(self.model, tokenizer, config, layers)
        was_training = self.model.training
        self.model.eval()
        try:
            rows = RequestRows(tokenizer, requests, templates)
            _, hidden = rows.read(self.model, layout, layers[0], layers[-1])
            with tqdm(
                total=len(requests),
                desc=f"{config.method}: target values",
                disable=len(requests) < 2 * config.value_batch_size(next(self.model.parameters()).device),
                leave=False,
            ) as bar:
                deltas = compute_deltas(
                    self.model,
                    tokenizer,
                    requests,
                    layout,
                    layers[-1],
                    templates,
                    config,
                    hidden.norm(dim=1),
                    bar,
                )
            solve = self.solver(config, moments, requests, tokenizer)
            factors, keys = spread_over_layers(self.model, rows, layout, layers, hidden + deltas, solve)
        finally:
            self.model.train(was_training)
        self.solved(config, requests, keys)
        return {mlp_out_name(layout, layer): factors[layer] for layer in layers}

    def solved(self, config: MemitConfig, requests, keys) -> None:
        """Called with the keys each layer's update was solved for (AlphaEdit remembers them)."""

    def solver(self, config: MemitConfig, moments, requests, tokenizer):
        def solve(layer, keys, residuals):
            preserved = moments[layer] if moments is not None else isotropic_covariance(keys)
            return least_squares_factors(keys, residuals, preserved, update_weight(config, keys))

        return solve


def update_weight(config: MemitConfig, keys) -> float:
    """λ. A typical key's Mahalanobis norm kᵀC⁻¹k is about the key dimension d, so each layer
    delivers about d / (λ + d) of its share: λ = d (the default) writes about half of it per layer,
    and the next layers make up the rest. MEMIT's fixed 15000 meant that on its models."""
    return float(config.mom2_update_weight if config.mom2_update_weight is not None else keys.shape[1])
