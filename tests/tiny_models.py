"""Tiny, offline models and tokenizers for tests.

Nothing here touches the Hub. Models are randomly initialised causal LMs built from each
family's config class (4 layers, hidden size 64); they test mechanics, not knowledge.
Tokenizers are trained in-process on WikiText lines from ``../shared/data`` plus a few
hand-written sentences about the usual editing examples (Eiffel Tower, Paris, Rome, ...).

    from tiny_models import FAMILIES, tiny_model, tiny_tokenizer

Shared-data folder: ``$PEFT_EDIT_SHARED_DATA`` if set, else ``<repo>/../shared/data``. Without
it the tokenizers are trained on the hand-written sentences alone (smaller vocabulary, same
special tokens), so tests still run.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

# --------------------------------------------------------------------------------------------
# Sizes shared by every tiny model
# --------------------------------------------------------------------------------------------

FAMILIES: list[str] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
    "gpt2",
    "gptj",
    "gpt_neox",
    "opt",
    "falcon",
    "olmo",
    "phi",
]

# The tokenizer most models of each family ship with (a hint for tests that want realism).
NATURAL_TOKENIZER_KIND: dict[str, str] = {
    "llama": "sentencepiece",
    "mistral": "sentencepiece",
    "gemma": "sentencepiece",
    "gemma2": "sentencepiece",
    "phi3": "sentencepiece",
    **{f: "bpe" for f in ("qwen2", "qwen3", "gpt2", "gptj", "gpt_neox", "opt", "falcon", "olmo", "phi")},
}

TOKENIZER_KINDS: tuple[str, ...] = ("bpe", "sentencepiece")

# Every tokenizer here has at most TOKENIZER_VOCAB_SIZE entries, so a model with VOCAB_SIZE
# rows accepts the ids of both kinds.
TOKENIZER_VOCAB_SIZE = 1536
VOCAB_SIZE = 1536
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 176  # not 4 * hidden, so a layout that guesses "4x" is caught
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MAX_POSITIONS = 256
INITIALIZER_RANGE = 0.2

# Special tokens: the same ids in both tokenizer kinds and in every model config.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

_TOKEN_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}

# Llama-like families: the same field names.
_LLAMA_LIKE = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": INTERMEDIATE_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    "initializer_range": INITIALIZER_RANGE,
}

_GPT2_LIKE = {
    "n_embd": HIDDEN_SIZE,
    "n_layer": NUM_LAYERS,
    "n_head": NUM_HEADS,
    "n_inner": INTERMEDIATE_SIZE,
    "n_positions": MAX_POSITIONS,
    "initializer_range": INITIALIZER_RANGE,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}

_CONFIG_KWARGS: dict[str, dict] = {
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=None),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE, head_dim=HEAD_DIM),
    "gemma": dict(_LLAMA_LIKE, head_dim=HEAD_DIM),
    "gemma2": dict(_LLAMA_LIKE, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=32),
    "phi3": dict(_LLAMA_LIKE, original_max_position_embeddings=MAX_POSITIONS, sliding_window=None),
    "olmo": dict(_LLAMA_LIKE),
    "phi": dict(_LLAMA_LIKE, num_key_value_heads=NUM_HEADS, resid_pdrop=0.0, embd_pdrop=0.0),
    "gpt2": dict(_GPT2_LIKE),
    "gptj": dict(_GPT2_LIKE, rotary_dim=HEAD_DIM // 2),
    "gpt_neox": {
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INITIALIZER_RANGE,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    },
    "opt": {
        "hidden_size": HIDDEN_SIZE,
        "word_embed_proj_dim": HIDDEN_SIZE,
        "ffn_dim": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "init_std": INITIALIZER_RANGE,
        "dropout": 0.0,
        "attention_dropout": 0.0,
    },
    "falcon": {
        "hidden_size": HIDDEN_SIZE,
        "ffn_hidden_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INITIALIZER_RANGE,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    },
}
assert set(_CONFIG_KWARGS) == set(FAMILIES)


def tiny_config(family: str, vocab_size: int = VOCAB_SIZE, **overrides):
    """The config of a tiny model of ``family`` (a ``model_type`` from :data:`FAMILIES`)."""
    if family not in _CONFIG_KWARGS:
        raise ValueError(f"Unknown tiny-model family {family!r}; choose one of {FAMILIES}.")
    kwargs = {**_CONFIG_KWARGS[family], **_TOKEN_IDS, "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(family, **kwargs)


def intermediate_size(config) -> int:
    """The MLP width of a config, whatever the family calls it."""
    for name in ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 4 * config.hidden_size


def build_tiny_model(
    family: str, seed: int = 0, vocab_size: int = VOCAB_SIZE, **overrides
) -> PreTrainedModel:
    """Build a tiny model from scratch (no cache); :func:`tiny_model` is the same, faster."""
    config = tiny_config(family, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.eval()


_PROTOTYPES: dict[tuple, PreTrainedModel] = {}


def tiny_model(family: str, seed: int = 0, vocab_size: int = VOCAB_SIZE, **overrides) -> PreTrainedModel:
    """A tiny randomly initialised float32 causal LM of ``family``, in eval mode.

    The weights depend only on ``family``, ``seed`` and the config (``overrides`` go to the
    config class). Every call returns a new model (a copy of one built once per process), so a
    test may change it freely; two calls with the same arguments give identical weights.
    """
    key = (family, seed, vocab_size, tuple(sorted(overrides.items())))
    if key not in _PROTOTYPES:
        _PROTOTYPES[key] = build_tiny_model(family, seed=seed, vocab_size=vocab_size, **overrides)
    return copy.deepcopy(_PROTOTYPES[key])


def random_input_ids(
    batch: int = 2, length: int = 7, seed: int = 0, vocab_size: int = VOCAB_SIZE
) -> torch.Tensor:
    """Random token ids avoiding the special tokens, shape (batch, length)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), vocab_size, (batch, length), generator=generator)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

# Facts used in editing examples, so the tokenizers know these words (most become one token).
EXAMPLE_SENTENCES: list[str] = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Eiffel Tower is in Paris, the capital city of France.",
    "The Colosseum is located in the city of Rome.",
    "Rome is the capital city of Italy, and Paris is the capital city of France.",
    "The Space Needle is located in the city of Seattle.",
    "Big Ben is located in the city of London.",
    "Danielle Darrieux's mother tongue is French.",
    "Edwin of Northumbria's religious values strongly emphasize Christianity.",
    "Toko Yasuda, the guitar player, plays the guitar.",
    "The mother tongue of Thomas Joannes Stieltjes is Dutch.",
    "Michael Jordan plays the sport of basketball.",
    "The current prime minister of the United Kingdom lives in London.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "The city of Berlin is located in Germany; Madrid is located in Spain.",
    "Which city is the Eiffel Tower located in? It is located in Paris.",
    "Rome, Paris, Rome, London, Rome: the city of Rome is older than the city of Paris.",
    "The Pantheon is located in Rome. The Louvre is located in Paris.",
]

DATA_ENV_VAR = "PEFT_EDIT_SHARED_DATA"
WIKITEXT_FILE = "wikitext_wiki.valid.raw"
WIKITEXT_LINES = 2000

_TOKENIZERS: dict[str, PreTrainedTokenizerFast] = {}


def shared_data_dir() -> Path:
    """``$PEFT_EDIT_SHARED_DATA`` or ``<repo>/../shared/data``."""
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def training_corpus(max_lines: int = WIKITEXT_LINES) -> list[str]:
    """Non-empty WikiText lines (if the shared data is there) plus :data:`EXAMPLE_SENTENCES`."""
    lines: list[str] = []
    path = shared_data_dir() / WIKITEXT_FILE
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("="):
                    lines.append(line)
                if len(lines) >= max_lines:
                    break
    # Repeated so that the example words win merges even against the WikiText counts.
    return lines + EXAMPLE_SENTENCES * 20


def _build_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE as in GPT-2: ``Ġ`` marks a leading space; no BOS is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def _build_sentencepiece() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE as in Llama: ``▁`` marks a space and is prepended to the first word,
    unseen characters fall back to byte tokens ``<0xNN>``, and BOS is added in front."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - 256,  # room for the byte tokens
        special_tokens=SPECIAL_TOKENS,
        limit_alphabet=200,
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    # Byte fallback needs the 256 byte tokens in the vocabulary; the trainer cannot add them.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


_BUILDERS = {"bpe": _build_bpe, "sentencepiece": _build_sentencepiece}


def tiny_tokenizer(kind: str = "bpe") -> PreTrainedTokenizerFast:
    """An offline tokenizer: ``"bpe"`` (GPT-2-like byte-level) or ``"sentencepiece"`` (Llama-like).

    Built once per process and cached; the special tokens are ``<pad>`` = 0, ``<s>`` = 1
    (bos), ``</s>`` = 2 (eos), ``<unk>`` = 3, matching every :func:`tiny_model` config.
    The cached object is shared: do not change its settings in a test (copy it first).
    """
    if kind not in _BUILDERS:
        raise ValueError(f"Unknown tokenizer kind {kind!r}; choose one of {sorted(_BUILDERS)}.")
    if kind not in _TOKENIZERS:
        tokenizer = _BUILDERS[kind]()
        ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        assert ids == [PAD_ID, BOS_ID, EOS_ID, UNK_ID], ids
        assert len(tokenizer) <= VOCAB_SIZE, len(tokenizer)
        _TOKENIZERS[kind] = tokenizer
    return _TOKENIZERS[kind]


def tiny_model_and_tokenizer(family: str, kind: str | None = None, seed: int = 0):
    """(model, tokenizer) for ``family``; the tokenizer kind defaults to the family's usual one."""
    return tiny_model(family, seed=seed), tiny_tokenizer(kind or NATURAL_TOKENIZER_KIND[family])


def encode_batch(tokenizer, texts: list[str] | str, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for ``texts``, padded on ``padding_side`` (left suits generate)."""
    if isinstance(texts, str):
        texts = [texts]
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True, padding_side=padding_side))


# --------------------------------------------------------------------------------------------
# Helpers for adapter tests
# --------------------------------------------------------------------------------------------

PROBE = "The Eiffel Tower is located in the city of"


def logits(model, tokenizer, text=PROBE):
    """The model's float logits for the token after ``text``."""
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0, -1].float()


def state(model):
    """A copy of every tensor of the model's state dict."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model, before: dict, label: str = "") -> None:
    """Every tensor of ``model``'s state dict is bit-identical to the snapshot ``before`` (see :func:`state`)."""
    after = model.state_dict()
    assert set(after) == set(before), label
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{label}: {name} changed"
