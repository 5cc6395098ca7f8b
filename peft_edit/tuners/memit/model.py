"""MEMIT as an edit adapter: a batch of edits is one low-rank (or dense) delta per edited MLP projection."""

from __future__ import annotations

from tqdm.auto import tqdm

from ...architectures import mlp_out_name
from ..delta.model import DeltaTuner
from ..locate.per_model import context_templates, second_moments
from .algorithm import compute_deltas, isotropic_covariance, least_squares_factors, spread_over_layers
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
            with tqdm(
                total=len(requests),
                desc=f"{config.method}: target values",
                disable=len(requests) < 2 * config.v_batch_size,
                leave=False,
            ) as bar:
                deltas = compute_deltas(
                    self.model, tokenizer, requests, layout, layers[-1], templates, config, bar
                )
            solve = self.solver(config, moments, requests, tokenizer)
            factors, keys = spread_over_layers(
                self.model, tokenizer, requests, layout, layers, templates, deltas, solve
            )
        finally:
            self.model.train(was_training)
        self.solved(config, requests, keys)
        return {mlp_out_name(layout, layer): factors[layer] for layer in layers}

    def solved(self, config: MemitConfig, requests, keys) -> None:
        """Called with the keys each layer's update was solved for (AlphaEdit remembers them)."""

    def solver(self, config: MemitConfig, moments, requests, tokenizer):
        def solve(layer, keys, residuals):
            preserved = moments[layer] if moments is not None else isotropic_covariance(keys)
            return least_squares_factors(keys, residuals, preserved, config.mom2_update_weight)

        return solve
