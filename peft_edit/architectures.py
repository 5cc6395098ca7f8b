"""Where each decoder-only model family keeps the parts that editing methods touch.

Locate-then-edit methods need five places: the list of transformer blocks, the MLP output
projection inside a block (ROME's target: its input is the "key", its output the "value"), that
projection's input size, the final norm and the LM head. Known families are listed in
``KNOWN_LAYOUTS``; any other decoder-only model is inferred structurally, and if that fails the
error names the config fields (``layers_path``, ``mlp_out_path``) that let the user say it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Layout:
    """Dotted module paths: ``layers`` and ``final_norm`` from the model root, ``mlp_out`` from a block."""

    layers: str
    mlp_out: str
    final_norm: str | None


# model_type -> (blocks, MLP output projection inside a block, final norm)
KNOWN_LAYOUTS: dict[str, Layout] = {
    **{
        t: Layout("model.layers", "mlp.down_proj", "model.norm")
        for t in (
            "llama",
            "mistral",
            "mixtral_dense",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "smollm3",
            "granite",
            "cohere",
            "stablelm",
        )
    },
    "internlm2": Layout("model.layers", "feed_forward.w2", "model.norm"),  # remote code
    "phi": Layout("model.layers", "mlp.fc2", "model.final_layernorm"),
    "gpt2": Layout("transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gptj": Layout("transformer.h", "mlp.fc_out", "transformer.ln_f"),
    "gpt_neo": Layout("transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gpt_neox": Layout("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "opt": Layout("model.decoder.layers", "fc2", "model.decoder.final_layer_norm"),
    "falcon": Layout("transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f"),
    "bloom": Layout("transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f"),
}

_MLP_OUT_NAMES = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2", "wo", "out_proj")


class UnsupportedModelError(ValueError):
    """The model's layout could not be found; the message says which config field to set."""


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedModelError(f"{type(model).__name__} has no module at {path!r}.") from err


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) sizes of a Linear or of GPT-2's transposed Conv1D (unwrapping adapter layers)."""
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise UnsupportedModelError(f"Expected a Linear or Conv1D projection, found {type(module).__name__}.")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as an (out, in) matrix, whatever its storage layout."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _config_num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _infer_layers_path(model: nn.Module) -> str | None:
    """The longest ModuleList of same-class blocks (its length matching the config when known)."""
    expected = _config_num_layers(model)
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        if best is None or len(module) > best[0]:
            best = (len(module), name)
    return best[1] if best else None


def _infer_mlp_out_path(block: nn.Module, hidden_size: int | None) -> str | None:
    """A projection that maps a wider hidden (the MLP's) back to the model width."""
    candidates = []
    for name, module in block.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        d_in, d_out = in_out_features(module)
        if hidden_size is not None and d_out != hidden_size:
            continue
        if d_in <= d_out:
            continue
        named_like_mlp_out = name.rsplit(".", 1)[-1] in _MLP_OUT_NAMES
        candidates.append((named_like_mlp_out, d_in, name))
    if not candidates:
        return None
    return max(candidates)[2]


def _infer_final_norm(model: nn.Module, layers_path: str) -> str | None:
    """The norm beside the blocks, preferring one registered after them (the final norm, not an
    embedding norm such as BLOOM's ``word_embeddings_layernorm``)."""
    backbone_path, _, layers_name = layers_path.rpartition(".")
    backbone = model.get_submodule(backbone_path) if backbone_path else model
    before, after, seen_layers = [], [], False
    for name, module in backbone.named_children():
        if name == layers_name:
            seen_layers = True
        elif "norm" in type(module).__name__.lower() or name.startswith("ln"):
            (after if seen_layers else before).append(name)
    found = (after or before or [None])[0]
    if found is None:
        return None
    return f"{backbone_path}.{found}" if backbone_path else found


def _known_layout(model: nn.Module, model_type: str | None) -> Layout | None:
    """The table's layout for ``model_type``, if its paths exist in this model.

    A bare backbone (``LlamaModel`` rather than ``LlamaForCausalLM``) or a wrapped model has the
    same ``model_type`` but other paths; those fall through to inference.
    """
    known = KNOWN_LAYOUTS.get(model_type)
    if known is None:
        return None
    try:
        blocks = model.get_submodule(known.layers)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return None
        blocks[0].get_submodule(known.mlp_out)
    except AttributeError:
        return None
    return known


def get_layout(model: nn.Module, layers_path: str | None = None, mlp_out_path: str | None = None) -> Layout:
    """The layout of ``model``: from the known table, the explicit paths given, or inferred."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = _known_layout(model, model_type)
    layers = layers_path or (known.layers if known else _infer_layers_path(model))
    if layers is None:
        raise UnsupportedModelError(
            f"Could not find the transformer blocks of {type(model).__name__} (model_type={model_type!r}). "
            "Set `layers_path` in the edit config to the dotted path of the block list, e.g. 'model.layers'."
        )
    try:
        blocks = model.get_submodule(layers)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"`layers_path` {layers!r} does not name a module of {type(model).__name__}; set it to the dotted "
            "path of the block list, e.g. 'model.layers'."
        ) from err
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(
            f"`layers_path` {layers!r} is a {type(blocks).__name__}, not a non-empty ModuleList of blocks."
        )
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    mlp_out = mlp_out_path or (known.mlp_out if known else _infer_mlp_out_path(blocks[0], hidden))
    if mlp_out is None:
        raise UnsupportedModelError(
            f"Could not find the MLP output projection in the blocks of {type(model).__name__} "
            f"(model_type={model_type!r}). Set `mlp_out_path` in the edit config to its path inside a block, "
            "e.g. 'mlp.down_proj'."
        )
    try:
        projection = blocks[0].get_submodule(mlp_out)
        in_out_features(projection)
    except (AttributeError, UnsupportedModelError) as err:
        raise UnsupportedModelError(
            f"`mlp_out_path` {mlp_out!r} does not name a Linear or Conv1D projection inside the blocks of "
            f"{type(model).__name__} ({err}); set it to the MLP output projection's path inside a block, "
            "e.g. 'mlp.down_proj'."
        ) from err
    final_norm = known.final_norm if (known and not layers_path) else _infer_final_norm(model, layers)
    return Layout(layers=layers, mlp_out=mlp_out, final_norm=final_norm)


def get_blocks(model: nn.Module, layout: Layout) -> nn.ModuleList:
    return model.get_submodule(layout.layers)


def num_layers(model: nn.Module, layout: Layout) -> int:
    return len(get_blocks(model, layout))


def mlp_out_name(layout: Layout, layer: int) -> str:
    """Full module name of the MLP output projection of block ``layer``."""
    return f"{layout.layers}.{layer}.{layout.mlp_out}"


def backbone(model: nn.Module, layout: Layout) -> nn.Module:
    """The module that runs embeddings, blocks and final norm (everything but the LM head).

    It is the model's first-level child that holds the blocks: ``model`` for "model.layers" and
    for OPT's "model.decoder.layers", ``transformer`` for GPT-2, ``gpt_neox`` for Pythia.
    """
    head, _, rest = layout.layers.partition(".")
    return model.get_submodule(head) if rest else model


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection (hidden -> vocabulary). Some families post-process its output into the
    logits (Gemma 2's soft-capping, Cohere's and Granite's scaling): use :func:`logits_from_hidden`
    to get the model's own logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no LM head; editing needs a causal language model."
        )
    return head


def logits_from_hidden(
    model: nn.Module,
    hidden: torch.Tensor,
    vocabulary: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits the model computes from its final hidden states (the backbone's output); with
    ``vocabulary`` (token ids), only those columns, computed from those rows of the head alone.

    ``head_weight`` stands in for a plain linear head's weight (a lower-precision copy of it, say);
    the hidden states and the bias are converted to its dtype.
    """
    head = lm_head(model)
    if head_weight is not None:
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head_weight needs a plain linear LM head, not {type(head).__name__}.")
        weight, bias = head_weight, head.bias
        if vocabulary is not None:
            weight, bias = weight[vocabulary], None if bias is None else bias[vocabulary]
        bias = None if bias is None else bias.to(weight.dtype)
        logits = nn.functional.linear(hidden.to(weight.dtype), weight, bias)
    elif vocabulary is None:
        logits = head(hidden)
    elif isinstance(head, nn.Linear):
        bias = None if head.bias is None else head.bias[vocabulary]
        logits = nn.functional.linear(hidden, head.weight[vocabulary], bias)
    else:  # a wrapped head: its own forward, then the columns
        logits = head(hidden)[..., vocabulary]
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logit_scale = getattr(config, "logit_scale", None)  # Cohere
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        logits = logits * logit_scale
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite
    if isinstance(logits_scaling, (int, float)) and not isinstance(logits_scaling, bool) and logits_scaling:
        logits = logits / logits_scaling
    return logits
