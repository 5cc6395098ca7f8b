"""ROME as an edit adapter: each edit is a rank-one delta on one MLP output projection."""

from __future__ import annotations

import weakref

import torch

from ...context_templates import sample_context_templates
from ..delta.model import DeltaTuner
from .algorithm import compute_key_and_delta, rank_one_factors
from .config import RomeConfig

# Per base model, kept while the model lives: edited models made one after another from the same
# base (evaluation's edit-score-restore loop) sample prefixes and load statistics once.
_CONTEXT_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COVARIANCE_SOLVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class RomeTuner(DeltaTuner):
    prefix = "rome_"

    def compute_edit(self, config: RomeConfig, requests, tokenizer):
        (request,) = requests
        layout = config.layout(self.model)
        (target,) = config.target_modules
        site = self.model.get_submodule(target)
        templates = self.context_templates(config, tokenizer)
        solve = self.covariance_solver(config, tokenizer)
        kv = compute_key_and_delta(
            self.model, tokenizer, request, layout, config.layer, site, templates, config, solve
        )
        A, B = rank_one_factors(kv.u, kv.delta)
        return {target: (A, B)}

    def context_templates(self, config: RomeConfig, tokenizer) -> list[str]:
        cache = _CONTEXT_TEMPLATES.setdefault(self.model, {})
        key = (tuple(config.context_template_lengths), config.context_templates_per_length, config.seed)
        if key not in cache:
            cache[key] = sample_context_templates(
                self.model,
                tokenizer,
                config.context_template_lengths,
                config.context_templates_per_length,
                config.seed,
            )
        return cache[key]

    def covariance_solver(self, config: RomeConfig, tokenizer):
        """``k -> C⁻¹ k`` for the edited layer's key covariance (computed or loaded once)."""
        cache = _COVARIANCE_SOLVERS.setdefault(self.model, {})
        key = (config.layer, config.stats_corpus, config.stats_samples)
        if key not in cache:
            cache[key] = make_covariance_solver(self.model, tokenizer, config)
        return cache[key]


def make_covariance_solver(model, tokenizer, config: RomeConfig):
    if config.stats_corpus == "identity":
        return lambda k: k
    from ...stats import key_second_moments

    moments = key_second_moments(
        model,
        tokenizer,
        [config.layer],
        corpus=None if config.stats_corpus == "model" else config.stats_corpus,
        sample_count=config.stats_samples,
        cache_dir=config.stats_cache_dir,
        layout=config.layout(model),
    )
    C = moments[config.layer].double()
    # A small ridge keeps the solve stable when the corpus leaves directions barely seen.
    C = C + 1e-5 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    factor = torch.linalg.cholesky(C)
    return lambda k: torch.cholesky_solve(k.to(C)[:, None], factor)[:, 0]
