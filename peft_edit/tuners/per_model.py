"""What edit methods compute once per base model: sampled prefixes and key statistics.

Both are kept while the model object lives (edited models made one after another from the same
base, as in evaluation's edit-score-restore loop, sample prefixes and load statistics once), and
statistics are also cached on disk by :mod:`peft_edit.stats`. Statistics describe the *unedited*
model, so they are computed with the edit adapters switched off.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..context_templates import sample_context_templates

_CONTEXT_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SECOND_MOMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def context_templates(model: nn.Module, tokenizer, config) -> list[str]:
    """``"{}"`` and the sampled prefixes ``"<prefix> {}"`` the value optimisation averages over."""
    cache = _CONTEXT_TEMPLATES.setdefault(model, {})
    key = (tuple(config.context_template_lengths), config.context_templates_per_length, config.seed)
    if key not in cache:
        if config.context_templates_per_length < 1:
            cache[key] = ["{}"]
        else:
            with adapters_disabled(model):
                cache[key] = sample_context_templates(
                    model,
                    tokenizer,
                    config.context_template_lengths,
                    config.context_templates_per_length,
                    config.seed,
                )
    return cache[key]


def second_moments(model: nn.Module, tokenizer, config, layers: list[int]) -> dict[int, torch.Tensor] | None:
    """``{layer: E[k kᵀ]}`` of the MLP output projection's input over ``config.stats_corpus``.

    None when ``stats_corpus == "identity"`` (no statistics). Missing layers are computed in one
    pass over the corpus.
    """
    if config.stats_corpus == "identity":
        return None
    cache = _SECOND_MOMENTS.setdefault(model, {})
    key = (config.stats_corpus, config.stats_samples)
    missing = [layer for layer in layers if (key, layer) not in cache]
    if missing:
        from ..stats import key_second_moments

        with adapters_disabled(model):
            computed = key_second_moments(
                model,
                tokenizer,
                missing,
                corpus=None if config.stats_corpus == "model" else config.stats_corpus,
                sample_count=config.stats_samples,
                cache_dir=config.stats_cache_dir,
                layout=config.layout(model),
            )
        device = next(model.parameters()).device  # statistics load on the CPU; edits solve beside the weights
        for layer in missing:
            cache[(key, layer)] = computed[layer].double().to(device)
    return {layer: cache[(key, layer)] for layer in layers}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Switch every adapter layer in ``model`` off for the duration (merged weights stay merged)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    # enable_adapters(True) marks the active adapters trainable; edit adapters stay frozen.
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)
