"""Where each family keeps its blocks, MLP output projection, final norm and LM head."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    FAMILIES,
    HIDDEN_SIZE,
    INTERMEDIATE_SIZE,
    NUM_LAYERS,
    VOCAB_SIZE,
    build_tiny_model,
    encode_batch,
    random_input_ids,
    tiny_model,
    tiny_tokenizer,
)
from torch import nn
from transformers import LlamaConfig, LlamaModel, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from peft_edit.architectures import (
    KNOWN_LAYOUTS,
    Layout,
    UnsupportedModelError,
    backbone,
    get_blocks,
    get_layout,
    in_out_features,
    lm_head,
    logits_from_hidden,
    mlp_out_name,
    num_layers,
    weight_out_in,
)

ATOL = 1e-5


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


def block_output(output):
    """A block returns a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


# ----------------------------------------------------------------------------------------------
# The tiny models themselves (the rest of the suite relies on them)
# ----------------------------------------------------------------------------------------------


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_model_is_deterministic_and_not_degenerate(family, model):
    assert model.config.model_type == family
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert state_equal(model, build_tiny_model(family))  # built again from scratch, not copied
    assert not state_equal(model, tiny_model(family, seed=1))
    with torch.no_grad():
        logits = model(random_input_ids(batch=8, length=5)).logits
    assert logits.shape == (8, 5, VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    # Different inputs give different next tokens: the random weights are not washed out.
    assert len(set(logits[:, -1].argmax(-1).tolist())) >= 4


def test_tiny_model_returns_a_fresh_copy_each_time(family, model):
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(1.0)
    model.config.model_type = "changed"
    again = tiny_model(family)
    assert again.config.model_type == family
    assert not torch.equal(again.get_output_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tiny_model_generates_from_tokenized_text(family, model, kind):
    tokenizer = tiny_tokenizer(kind)
    assert len(tokenizer) <= model.config.vocab_size
    inputs = encode_batch(tokenizer, ["The Eiffel Tower is located in the city of", "Rome is"])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert isinstance(tokenizer.batch_decode(out[:, -4:]), list)


# ----------------------------------------------------------------------------------------------
# The known layouts
# ----------------------------------------------------------------------------------------------


def test_every_family_is_in_the_table(family):
    assert family in KNOWN_LAYOUTS


def test_layers_resolve_to_the_blocks(model):
    layout = get_layout(model)
    blocks = get_blocks(model, layout)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == model.config.num_hidden_layers == NUM_LAYERS == num_layers(model, layout)
    assert blocks is model.get_submodule(layout.layers)


def test_mlp_out_is_the_projection_back_from_the_mlp(model):
    layout = get_layout(model)
    for i, block in enumerate(get_blocks(model, layout)):
        projection = block.get_submodule(layout.mlp_out)
        assert isinstance(projection, (nn.Linear, Conv1D))
        assert in_out_features(projection) == (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        assert weight_out_in(projection).shape == (HIDDEN_SIZE, INTERMEDIATE_SIZE)
        assert model.get_submodule(mlp_out_name(layout, i)) is projection


def test_mlp_out_runs_once_per_block_on_the_mlp_hidden(model):
    layout = get_layout(model)
    seen = []
    hooks = [
        model.get_submodule(mlp_out_name(layout, i)).register_forward_hook(
            lambda mod, args, out, i=i: seen.append((i, args[0].shape[-1], out.shape[-1]))
        )
        for i in range(NUM_LAYERS)
    ]
    try:
        with torch.no_grad():
            model(random_input_ids())
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [(i, INTERMEDIATE_SIZE, HIDDEN_SIZE) for i in range(NUM_LAYERS)]


def test_weight_out_in_matches_what_the_projection_computes(model):
    projection = model.get_submodule(mlp_out_name(get_layout(model), 0))
    x = torch.randn(3, INTERMEDIATE_SIZE)
    bias = projection.bias if projection.bias is not None else torch.zeros(HIDDEN_SIZE)
    with torch.no_grad():
        expected = projection(x) - bias
        assert torch.allclose(expected, x @ weight_out_in(projection).T, atol=ATOL)


def test_gpt2_conv1d_is_transposed():
    model = tiny_model("gpt2")
    projection = model.get_submodule(mlp_out_name(get_layout(model), 1))
    assert isinstance(projection, Conv1D)
    assert projection.weight.shape == (INTERMEDIATE_SIZE, HIDDEN_SIZE)  # stored (in, out)
    assert weight_out_in(projection).shape == (HIDDEN_SIZE, INTERMEDIATE_SIZE)
    # A view, so that code writing into weight_out_in(...) changes the model.
    assert weight_out_in(projection).data_ptr() == projection.weight.data_ptr()


def test_final_norm_turns_the_last_block_output_into_the_last_hidden_state(model):
    layout = get_layout(model)
    assert layout.final_norm is not None
    norm = model.get_submodule(layout.final_norm)
    assert "norm" in type(norm).__name__.lower()
    captured = {}
    last_block = get_blocks(model, layout)[-1]
    hook = last_block.register_forward_hook(lambda mod, args, out: captured.update(h=block_output(out)))
    try:
        with torch.no_grad():
            out = model(random_input_ids(), output_hidden_states=True)
    finally:
        hook.remove()
    with torch.no_grad():
        assert torch.allclose(norm(captured["h"]), out.hidden_states[-1], atol=ATOL)


def test_backbone_and_lm_head_reproduce_the_model(family, model):
    layout = get_layout(model)
    ids = random_input_ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = backbone(model, layout)(input_ids=ids).last_hidden_state
        assert torch.allclose(hidden, out.hidden_states[-1], atol=ATOL)
        assert lm_head(model) is model.get_output_embeddings()
        assert torch.allclose(logits_from_hidden(model, hidden), out.logits, atol=1e-4)
        raw = lm_head(model)(hidden)
    if family == "gemma2":  # soft-capped logits: the raw head output is not the logits
        cap = model.config.final_logit_softcapping
        assert torch.allclose(torch.tanh(raw / cap) * cap, out.logits, atol=1e-4)
    else:
        assert torch.allclose(raw, out.logits, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Structural inference, for model types the table does not know
# ----------------------------------------------------------------------------------------------


def test_inference_finds_the_same_layout_as_the_table(family, model):
    known = get_layout(model)
    model.config.model_type = "my_custom"
    assert get_layout(model) == known


def test_inference_for_a_bare_backbone():
    model = LlamaModel(LlamaConfig(**tiny_model("llama").config.to_dict()))
    # model_type is "llama", but the table's paths ("model.layers") do not exist here.
    assert get_layout(model) == Layout(layers="layers", mlp_out="mlp.down_proj", final_norm="norm")


def test_inference_for_renamed_modules():
    model = tiny_model("llama")
    model.config.model_type = "my_custom"
    inner = model.model
    inner.blocks = inner.layers
    del inner.layers
    for block in inner.blocks:
        block.mlp.out = block.mlp.down_proj
        del block.mlp.down_proj
    layout = get_layout(model)
    assert layout == Layout(layers="model.blocks", mlp_out="mlp.out", final_norm="model.norm")


def test_inference_prefers_the_norm_after_the_blocks():
    model = TinyCustomLM()
    assert get_layout(model).final_norm == "trunk.ln_final"


def test_explicit_paths_for_a_known_family_override_the_table():
    model = tiny_model("gpt2")
    layout = get_layout(model, layers_path="transformer.h", mlp_out_path="mlp.c_fc")
    assert layout == Layout(layers="transformer.h", mlp_out="mlp.c_fc", final_norm="transformer.ln_f")


# A model the table cannot know: blocks in "trunk.blocks", MLP as "ffn.inp" / "ffn.outp".


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny_custom_for_tests"

    def __init__(self, hidden_size=16, mlp_size=48, num_hidden_layers=3, vocab_size=50, **kwargs):
        self.hidden_size = hidden_size
        self.mlp_size = mlp_size
        self.num_hidden_layers = num_hidden_layers
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class TinyBlock(nn.Module):
    def __init__(self, hidden, mlp_size):
        super().__init__()
        self.mix = nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential()
        self.ffn.add_module("inp", nn.Linear(hidden, mlp_size))
        self.ffn.add_module("act", nn.GELU())
        self.ffn.add_module("outp", nn.Linear(mlp_size, hidden))

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.ffn(x)


class TinyCustomLM(nn.Module):
    def __init__(self, config=None, mlp_size=None, num_blocks=None):
        super().__init__()
        self.config = config or TinyCustomConfig()
        c = self.config
        self.trunk = nn.Module()
        self.trunk.emb = nn.Embedding(c.vocab_size, c.hidden_size)
        self.trunk.ln_emb = nn.LayerNorm(c.hidden_size)
        self.trunk.blocks = nn.ModuleList(
            TinyBlock(c.hidden_size, mlp_size or c.mlp_size) for _ in range(num_blocks or c.num_hidden_layers)
        )
        self.trunk.ln_final = nn.LayerNorm(c.hidden_size)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def get_output_embeddings(self):
        return self.head


def test_custom_model_is_inferred():
    layout = get_layout(TinyCustomLM())
    assert layout == Layout(layers="trunk.blocks", mlp_out="ffn.outp", final_norm="trunk.ln_final")


def test_inference_fails_without_a_block_list_and_names_layers_path():
    model = TinyCustomLM()
    model.trunk.blocks = nn.Sequential(*model.trunk.blocks)  # not a ModuleList
    with pytest.raises(UnsupportedModelError, match="layers_path"):
        get_layout(model)


def test_inference_fails_when_no_list_matches_the_layer_count():
    model = TinyCustomLM(num_blocks=2)  # the config says 3
    with pytest.raises(UnsupportedModelError, match="layers_path"):
        get_layout(model)
    assert get_layout(model, layers_path="trunk.blocks").layers == "trunk.blocks"


def test_inference_fails_without_a_widening_mlp_and_names_mlp_out_path():
    model = TinyCustomLM(mlp_size=16)  # MLP as wide as the model: nothing maps wide -> narrow
    with pytest.raises(UnsupportedModelError, match="mlp_out_path"):
        get_layout(model)
    layout = get_layout(model, mlp_out_path="ffn.outp")
    assert layout == Layout(layers="trunk.blocks", mlp_out="ffn.outp", final_norm="trunk.ln_final")


def test_explicit_paths_for_a_model_the_table_does_not_know():
    model = TinyCustomLM(num_blocks=2, mlp_size=16)
    layout = get_layout(model, layers_path="trunk.blocks", mlp_out_path="ffn.outp")
    assert layout == Layout(layers="trunk.blocks", mlp_out="ffn.outp", final_norm="trunk.ln_final")
    assert num_layers(model, layout) == 2
    assert in_out_features(model.get_submodule(mlp_out_name(layout, 1))) == (16, 16)
    assert backbone(model, layout) is model.trunk
    assert lm_head(model) is model.head


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"layers_path": "trunk.nope"}, "layers_path"),
        ({"layers_path": "trunk.ln_final"}, "layers_path"),  # not a ModuleList
        ({"mlp_out_path": "ffn.nope"}, "mlp_out_path"),
        ({"mlp_out_path": "ffn.act"}, "mlp_out_path"),  # not a projection
    ],
)
def test_bad_explicit_paths_name_the_field(kwargs, field):
    with pytest.raises(UnsupportedModelError, match=field):
        get_layout(TinyCustomLM(), **kwargs)


def test_bad_explicit_paths_on_a_known_family_name_the_field():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="mlp_out_path"):
        get_layout(model, mlp_out_path="mlp.act_fn")
    with pytest.raises(UnsupportedModelError, match="layers_path"):
        get_layout(model, layers_path="model.blocks")


def test_lm_head_is_required():
    model = TinyCustomLM()
    model.get_output_embeddings = lambda: None
    with pytest.raises(UnsupportedModelError, match="LM head"):
        lm_head(model)
