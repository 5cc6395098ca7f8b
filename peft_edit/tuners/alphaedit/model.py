"""AlphaEdit as an edit adapter: MEMIT's storage and layers, a null-space-projected update.

For sequential editing the keys of the edits already in the adapter are preserved too (their
Gram matrix Kp Kpᵀ per layer). It is kept in memory while the process runs and rebuilt from the
ledger's requests when it does not cover them (after loading a saved adapter, or after a failed
``edit`` was rolled back); requests replaced by a contradicting edit are left out of it.
"""

from __future__ import annotations

import weakref

import torch

from ..memit.algorithm import request_keys
from ..memit.model import MemitTuner
from ..per_model import context_templates
from .algorithm import nullspace_projector, projected_factors
from .config import AlphaEditConfig

_PROJECTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class AlphaEditTuner(MemitTuner):
    prefix = "alphaedit_"

    def solver(self, config: AlphaEditConfig, moments, requests, tokenizer):
        earlier = self._earlier_gram(config, tokenizer)
        projectors = _PROJECTORS.setdefault(self.model, {})

        def solve(layer, keys, residuals):
            key = (config.stats_corpus, config.stats_samples, layer, config.nullspace_threshold)
            if key not in projectors:
                projectors[key] = nullspace_projector(moments[layer], config.nullspace_threshold)
            ridge = config.regularization * float(moments[layer].trace())  # in units of E‖k‖²
            gram = earlier.get(layer, torch.zeros_like(projectors[key]))
            return projected_factors(keys, residuals, projectors[key], gram, ridge)

        return solve

    def solved(self, config: AlphaEditConfig, requests, keys) -> None:
        covered, gram = self._gram_cache.get(id(config), (None, {}))
        updated = {layer: gram.get(layer, 0) + (K.double().T @ K.double()) for layer, K in keys.items()}
        self._gram_cache[id(config)] = (len(config.requests()) + len(requests), updated)

    @property
    def _gram_cache(self) -> dict:
        if not hasattr(self, "_preserved"):
            self._preserved = {}
        return self._preserved

    def _earlier_gram(self, config: AlphaEditConfig, tokenizer) -> dict[int, torch.Tensor]:
        """Kp Kpᵀ per layer for the requests the adapter holds (rebuilt when the cache does not cover them)."""
        held = [r for r in config.requests()]
        covered, gram = self._gram_cache.get(id(config), (None, {}))
        if covered == len(held):
            return gram
        gram = {}
        if held:
            templates = context_templates(self.model, tokenizer, config)
            keys = request_keys(
                self.model, tokenizer, held, config.layout(self.model), list(config.layers), templates
            )
            gram = {layer: K.double().T @ K.double() for layer, K in keys.items()}
        self._gram_cache[id(config)] = (len(held), gram)
        return gram
