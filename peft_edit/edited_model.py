"""The user-facing entry points: make an edited model, load one, save one safely."""

from __future__ import annotations

import copy
import os

from peft import PeftConfig, PeftModel, PeftModelForCausalLM
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .atomic import atomic_directory
from .requests import as_requests, check_requests_tokenize
from .tuners.config import EditConfig


class EditedModel(PeftModelForCausalLM):
    """A ``PeftModelForCausalLM`` whose saves are atomic.

    Everything else (``edit``, ``unload_edits``, ``ledger``, ``save_as_lora``, merging, generation)
    is peft's or the edit tuner's, reached the usual way, so a plain ``PeftModel`` loaded with
    ``PeftModel.from_pretrained`` offers the same methods.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        with atomic_directory(save_directory) as staging:
            super().save_pretrained(str(staging), *args, **kwargs)


def get_edited_model(
    model: nn.Module,
    config: EditConfig,
    requests=None,
    tokenizer=None,
    adapter_name: str = "default",
    progress: bool = True,
) -> EditedModel:
    """Wrap ``model`` with an edit adapter and write ``requests`` into it.

    Everything that can be checked (requests, tokenization, the model's layout, the config) is
    checked before the model is touched; if computing an edit fails, the adapter is removed again
    and ``model`` is returned to its original state before the error propagates.
    """
    if not isinstance(config, EditConfig):
        raise TypeError(f"config must be an edit config such as RomeConfig(), got {type(config).__name__}.")
    if requests is not None:
        requests = as_requests(requests)
        if tokenizer is None:
            raise ValueError("Editing needs the model's tokenizer: pass tokenizer=....")
        check_requests_tokenize(tokenizer, requests)
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "This model already holds adapter layers. To add edits to an edited model call its .edit(requests); "
            "to start again from the original model use unload_edits() first."
        )
    config = copy.deepcopy(config)  # the caller's config object stays reusable
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    edited = EditedModel(model, config, adapter_name=adapter_name)  # resolves and checks before injecting
    if tokenizer is not None:
        edited.base_model._tokenizer = tokenizer
    if requests:
        try:
            edited.edit(requests, tokenizer=tokenizer, progress=progress)
        except BaseException:
            edited.unload_edits()
            raise
    return edited


def load_edited_model(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    verify_base_weights: bool = True,
    tokenizer=None,
    **kwargs,
) -> EditedModel:
    """Load a saved edit adapter onto ``model`` (``PeftModel.from_pretrained`` with peft-edit's extras).

    ``verify_base_weights=False`` applies the adapter even if ``model``'s targeted weights differ
    from those the edits were computed against.
    """
    config = PeftConfig.from_pretrained(str(path))
    if not isinstance(config, EditConfig):
        raise ValueError(f"{path} holds a {type(config).__name__} adapter, not a peft-edit adapter.")
    config.verify_base_weights = verify_base_weights
    loaded = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=config, **kwargs)
    loaded.__class__ = EditedModel  # same state, atomic saves
    if tokenizer is not None:
        loaded.base_model._tokenizer = tokenizer
    return loaded
