"""ROME as an edit adapter: each edit is a rank-one delta on one MLP output projection."""

from __future__ import annotations

import torch

from ..delta.model import DeltaTuner
from ..per_model import context_templates, second_moments
from .algorithm import compute_key_and_delta, rank_one_factors
from .config import RomeConfig


class RomeTuner(DeltaTuner):
    prefix = "rome_"

    def compute_edit(self, config: RomeConfig, requests, tokenizer):
        (request,) = requests
        layout = config.layout(self.model)
        (target,) = config.target_modules
        site = self.model.get_submodule(target)
        templates = context_templates(self.model, tokenizer, config)
        solve = covariance_solver(second_moments(self.model, tokenizer, config, [config.layer]), config.layer)
        kv = compute_key_and_delta(
            self.model, tokenizer, request, layout, config.layer, site, templates, config, solve
        )
        A, B = rank_one_factors(kv.u, kv.delta)
        return {target: (A, B)}


def covariance_solver(moments: dict[int, torch.Tensor] | None, layer: int):
    """``k -> C⁻¹ k`` for the layer's key covariance (``k -> k`` without statistics)."""
    if moments is None:
        return lambda k: k
    C = moments[layer].double()
    # A small ridge keeps the solve stable when the corpus leaves directions barely seen.
    C = C + 1e-5 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    factor = torch.linalg.cholesky(C)
    return lambda k: torch.cholesky_solve(k.to(C)[:, None], factor)[:, 0]
