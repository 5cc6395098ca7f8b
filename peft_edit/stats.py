"""Second moments of MLP keys ("mom2"): C = E[k kᵀ], streamed, cached on disk and resumable.

ROME, MEMIT and AlphaEdit need, for a block ``L``, the uncentred second moment of the *key*
``k``: the input of that block's MLP output projection (``mlp.down_proj`` in Llama, the
transposed ``mlp.c_proj`` Conv1D in GPT-2), averaged over the tokens of a text corpus. C tells
the edit which directions of key space ordinary text uses, so an edit changes the chosen key's
value while disturbing the others as little as possible.

How it is computed, and why:

- One pass over the corpus feeds every requested layer: a forward pre-hook on each layer's
  projection reads its input, and the hook of the deepest layer stops the forward, so blocks
  above it (and the LM head) are never run.
- Only real tokens count (padding is masked out), and exactly ``sample_count`` of them: the last
  batch contributes only the tokens still needed. Sums accumulate in ``precision`` (float32 or
  float64); the result is float32 on the CPU.
- The default corpus (``corpus=None``) is text **sampled from the model itself**, starting from
  its BOS token with a fixed seed. It needs no data and no network, so stats work offline for
  any model, and the keys follow the model's own distribution (which is what an edit should
  preserve) rather than a web corpus that may not match the model's training data. A local text
  file, a list of strings or a ``datasets`` dataset (or Hub dataset id) can be given instead;
  ``corpus="identity"`` turns covariance off (C = I), as EasyEdit's option does.
- Results are cached as safetensors, one file per (model identity, layer, corpus identity,
  sample_count, max_length, precision), so a second call, in any process, runs no forward pass.
  The model identity hashes the weights that shape the keys at that layer (embeddings and blocks
  up to the projection's input); the projection's own weight does not change its input, so
  editing it (which is what ROME does) keeps the cache valid. Every ``checkpoint_every`` batches,
  and when interrupted, the running sums are saved next to the final file, and the next call
  with the same arguments resumes from them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .architectures import Layout, get_layout, in_out_features, mlp_out_name, num_layers
from .capture import capture

IDENTITY = "identity"
"""``corpus=IDENTITY`` returns identity matrices: covariance off."""

SAMPLED_TOP_K = 50
SAMPLED_SEED = 0
FORMAT_VERSION = "1"
_EMBED_ROWS = 64  # embedding rows hashed: the first ones, and as many spread over the vocabulary
_PROBE_TEXT = "The Eiffel Tower is located in Paris.\n  1,234 café — x"
_TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md", ".tokens")


@dataclass
class _Batch:
    input_ids: torch.Tensor
    mask: torch.Tensor  # bool (batch, length): the real tokens
    documents: int  # corpus documents this batch consumed (empty ones included)


@dataclass
class _Corpus:
    identity: str
    batches: Callable[[int], Iterator[_Batch]]  # documents to skip -> batches


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def key_second_moments(
    model: nn.Module,
    tokenizer,
    layers: Sequence[int],
    corpus=None,
    *,
    sample_count: int = 20_000,
    max_length: int = 256,
    batch_size: int = 8,
    precision: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    layout: Layout | None = None,
    checkpoint_every: int = 50,
    sampling_batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """{layer: C (in_features x in_features, float32 on CPU)} with C = mean of k kᵀ over `sample_count` tokens.

    ``corpus``: ``None`` (text sampled from the model, the default), ``"identity"`` (C = I), a
    path to a UTF-8 text file, an iterable of strings, a ``datasets.Dataset`` with a "text"
    column, or a Hugging Face dataset id (loaded with ``load_dataset(id, split="train")``).
    With ``use_cache`` the result is read from / written to ``cache_dir`` (default
    ``cache_root()/stats``), and an interrupted computation resumes from its last checkpoint
    (written every ``checkpoint_every`` batches and on an exception such as Ctrl-C).
    ``sampling_batch_size``: sequences per ``generate`` call for the model-sampled corpus.
    """
    layout = layout or get_layout(model)
    layers = _check_arguments(
        model,
        layout,
        layers,
        precision,
        sample_count=sample_count,
        max_length=max_length,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        sampling_batch_size=sampling_batch_size,
    )
    projections = {layer: model.get_submodule(mlp_out_name(layout, layer)) for layer in layers}
    if isinstance(corpus, str) and corpus == IDENTITY:
        return {layer: torch.eye(_in_features(p)) for layer, p in projections.items()}
    source = _resolve_corpus(
        corpus, model, tokenizer, max_length, batch_size, sample_count, sampling_batch_size
    )
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    settings = {"sample_count": sample_count, "max_length": max_length, "precision": str(precision)}
    cache = _CacheFiles(
        folder, _model_tag(model), model_identities(model, layout, layers), source.identity, settings
    )
    result = {layer: cache.load(layer) for layer in layers} if use_cache else {}
    missing = [layer for layer in layers if result.get(layer) is None]
    if missing:
        partial = cache.partial(missing) if use_cache else None
        run = _Run(model, {layer: projections[layer] for layer in missing}, source, sample_count, precision)
        means, meta = run.compute(partial, checkpoint_every, progress)
        result.update(means)
        if use_cache:
            cache.save(means, meta)
            partial.unlink(missing_ok=True)
    return {layer: result[layer] for layer in layers}


def _check_arguments(model, layout, layers, precision, **counts: int) -> list[int]:
    """Validate everything before the model is touched; returns the sorted, unique layers."""
    if precision not in (torch.float32, torch.float64):
        raise ValueError(f"`precision` must be torch.float32 or torch.float64, got {precision}.")
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if isinstance(layers, int):
        layers = [layers]
    count = num_layers(model, layout)
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad or not layers:
        raise ValueError(
            f"`layers` must be a non-empty list of block indices in [0, {count}), got {list(layers)}."
        )
    return sorted(set(int(layer) for layer in layers))


def _in_features(projection: nn.Module) -> int:
    """Key size; a PEFT-wrapped projection is measured on its base layer."""
    base = projection.get_base_layer() if hasattr(projection, "get_base_layer") else projection
    return in_out_features(base)[0]


def _default_cache_dir() -> Path:
    from .demo import cache_root

    return cache_root() / "stats"


# ----------------------------------------------------------------------------------------------
# Accumulation: one pass, all layers, exact token count, checkpoints
# ----------------------------------------------------------------------------------------------


class _Run:
    """One streaming pass over a corpus that accumulates Σ k kᵀ for several layers at once."""

    def __init__(self, model, projections, source, sample_count, precision):
        self.model, self.projections, self.source = model, projections, source
        self.sample_count, self.precision = sample_count, precision
        self.partial: Path | None = None
        self.sums = {
            layer: torch.zeros(_in_features(p), _in_features(p), dtype=precision, device=_weight_device(p))
            for layer, p in projections.items()
        }
        self.tokens = self.documents = 0
        self.captured: dict[int, torch.Tensor] = {}

    def compute(self, partial: Path | None, checkpoint_every: int, progress: bool):
        """Run the pass, resuming from and saving checkpoints at `partial`; (means, metadata)."""
        self.partial = partial
        if partial is not None:
            self._resume()
        with _inference_mode(self.model), self._progress_bar(progress) as bar:
            unsaved = 0
            try:
                batches = self.source.batches(self.documents) if self.tokens < self.sample_count else ()
                for batch in batches:
                    bar.update(self._add_batch(batch))
                    unsaved += 1
                    if self.tokens >= self.sample_count:
                        break
                    if self.partial is not None and unsaved >= checkpoint_every:
                        self._save_partial()
                        unsaved = 0
            except BaseException:
                if self.partial is not None and unsaved:
                    self._save_partial()
                raise
        return self._means(), {"tokens": str(self.tokens), "documents": str(self.documents)}

    def _add_batch(self, batch: _Batch) -> int:
        """Forward one batch (hooks capture the keys) and add the first tokens still needed."""
        take = min(int(batch.mask.sum()), self.sample_count - self.tokens)
        if take > 0:
            self._forward(batch)
        sums = dict(self.sums)
        for layer, keys in self.captured.items():
            k = keys[:take].to(sums[layer].device, self.precision)
            sums[layer] = torch.addmm(sums[layer], k.T, k)
        # Committed together, so an interruption never leaves sums and counts out of step.
        self.sums, self.captured = sums, {}
        self.tokens, self.documents = self.tokens + take, self.documents + batch.documents
        return take

    def _forward(self, batch: _Batch) -> None:
        """Run the model on a batch up to the deepest projection; fills `self.captured`."""
        device = self.model.get_input_embeddings().weight.device
        mask = batch.mask.to(device)

        def real_tokens(keys: torch.Tensor) -> torch.Tensor:
            # (batch, tokens, in) — OPT's MLP sees them flattened to (batch * tokens, in).
            return keys.reshape(*mask.shape, keys.shape[-1])[mask]  # (real tokens, in), row-major

        self.captured, _ = capture(
            lambda: self.model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.mask.long().to(device),
                use_cache=False,
            ),
            inputs=self.projections,
            transform=real_tokens,
        )

    def _progress_bar(self, progress: bool):
        layers = ",".join(map(str, self.projections))
        return tqdm(
            total=self.sample_count,
            initial=self.tokens,
            unit="tok",
            desc=f"key stats (layers {layers})",
            disable=not progress,
        )

    def _means(self) -> dict[int, torch.Tensor]:
        if self.tokens == 0:
            raise ValueError(f"The corpus {self.source.identity!r} produced no tokens.")
        if self.tokens < self.sample_count:
            warnings.warn(
                f"The corpus ran out after {self.tokens} of the {self.sample_count} tokens requested; "
                "the statistics use the tokens seen.",
                stacklevel=4,
            )
        return {
            layer: (s / self.tokens).to(device="cpu", dtype=torch.float32) for layer, s in self.sums.items()
        }

    def _save_partial(self) -> None:
        tensors = {f"sum.{layer}": s.cpu() for layer, s in self.sums.items()}
        meta = {"tokens": str(self.tokens), "documents": str(self.documents), "corpus": self.source.identity}
        _atomic_save(tensors, self.partial, meta)

    def _resume(self) -> None:
        """Continue from a partial checkpoint of the same pass, if there is a readable one."""
        if not self.partial.exists():
            return
        try:
            with safe_open(str(self.partial), framework="pt") as f:
                meta = f.metadata()
                sums = {layer: f.get_tensor(f"sum.{layer}") for layer in self.sums}
            if any(
                sums[layer].shape != s.shape or sums[layer].dtype != s.dtype for layer, s in self.sums.items()
            ):
                raise ValueError("shape or dtype mismatch")
            tokens, documents = int(meta["tokens"]), int(meta["documents"])
        except Exception as err:  # a damaged checkpoint only costs the work it held
            warnings.warn(f"Ignoring unreadable statistics checkpoint {self.partial}: {err}", stacklevel=4)
            return
        self.sums = {layer: sums[layer].to(s.device) for layer, s in self.sums.items()}
        self.tokens, self.documents = tokens, documents


def _weight_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def _inference_mode(model: nn.Module):
    """no_grad and eval mode, restoring every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


# ----------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------


def _resolve_corpus(
    corpus, model, tokenizer, max_length, batch_size, sample_count, sampling_batch_size
) -> _Corpus:
    """Turn the `corpus` argument into an identity string and a resumable batch stream."""
    if corpus is None:
        return _sampled_corpus(model, tokenizer, max_length, batch_size, sample_count, sampling_batch_size)
    if isinstance(corpus, os.PathLike) or (isinstance(corpus, str) and _looks_like_path(corpus)):
        return _file_corpus(Path(corpus), tokenizer, max_length, batch_size)
    if isinstance(corpus, str):
        return _hub_dataset_corpus(corpus, tokenizer, max_length, batch_size)
    if hasattr(corpus, "column_names") and type(corpus).__module__.startswith("datasets"):
        return _dataset_corpus(corpus, tokenizer, max_length, batch_size)
    if isinstance(corpus, Iterable):
        return _strings_corpus(corpus, tokenizer, max_length, batch_size)
    raise TypeError(f"Unsupported corpus of type {type(corpus).__name__}; see `key_second_moments`.")


def _looks_like_path(text: str) -> bool:
    """An existing file, or something no Hub dataset id looks like (so a typo is not sent to the Hub)."""
    if os.path.exists(text):
        return True
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text)
    return hub_id is None or text.lower().endswith(_TEXT_SUFFIXES)


def _file_corpus(path: Path, tokenizer, max_length: int, batch_size: int) -> _Corpus:
    """A local UTF-8 text file; identified by absolute path, size and modification time."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"Statistics corpus {str(path)!r} {what}. Pass a UTF-8 text file, a list of strings, a "
            "`datasets.Dataset`, a Hugging Face dataset id, None (text sampled from the model) or 'identity'."
        )
    if not os.access(path, os.R_OK):
        raise PermissionError(f"Statistics corpus {str(path)!r} is not readable.")
    info = path.stat()
    identity = f"file:{path.resolve()}:{info.st_size}:{info.st_mtime_ns}:{_tokenizer_identity(tokenizer)}"
    return _Corpus(
        identity,
        lambda skip: _text_batches(read_text_documents(path), tokenizer, max_length, batch_size, skip),
    )


def read_text_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents of a text file: blocks between blank lines or WikiText headings (" = Title = ").

    Headings are separators, not content; empty documents are dropped. The file is streamed.
    """
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip() and not line.startswith(" = "):
                    lines.append(line.rstrip())
                elif lines:
                    yield "\n".join(lines).strip()
                    lines = []
    except UnicodeDecodeError as err:
        raise ValueError(f"Statistics corpus {str(path)!r} is not UTF-8 text: {err}") from err
    if lines:
        yield "\n".join(lines).strip()


def _strings_corpus(texts: Iterable, tokenizer, max_length: int, batch_size: int) -> _Corpus:
    """An iterable of strings, materialised so it can be hashed and replayed on resume."""
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("An iterable corpus must contain only strings.")
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    identity = f"strings:{len(texts)}:{digest.hexdigest()}:{_tokenizer_identity(tokenizer)}"
    return _Corpus(identity, lambda skip: _text_batches(iter(texts), tokenizer, max_length, batch_size, skip))


def _hub_dataset_corpus(name: str, tokenizer, max_length: int, batch_size: int) -> _Corpus:
    """A Hugging Face dataset id, loaded (split "train") only when the cache misses.

    Identified by its id alone, so a cached result is reused without touching the network.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{name!r} is neither a local file nor usable as a dataset id: loading Hugging Face datasets "
            "needs the `datasets` package (pip install datasets). Or pass a local text file, a list of "
            "strings, or corpus=None for text sampled from the model."
        ) from err

    def batches(skip: int) -> Iterator[_Batch]:
        dataset = datasets.load_dataset(name, split="train")
        return _dataset_corpus(dataset, tokenizer, max_length, batch_size).batches(skip)

    return _Corpus(f"hub-dataset:{name}:train:{_tokenizer_identity(tokenizer)}", batches)


def _dataset_corpus(dataset, tokenizer, max_length: int, batch_size: int) -> _Corpus:
    """A `datasets` dataset's "text" column; identified by its name and fingerprint."""
    if "text" not in (dataset.column_names or []):
        raise ValueError(f"The statistics dataset needs a 'text' column; it has {dataset.column_names}.")
    info = getattr(dataset, "info", None)
    label = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    fingerprint = getattr(dataset, "_fingerprint", None)
    if label is None and fingerprint is None:
        raise ValueError(
            "Cannot identify this dataset for caching (no name, no fingerprint); pass use_cache=False."
        )
    identity = (
        f"dataset:{label}:{getattr(info, 'config_name', None)}:{fingerprint}:{_tokenizer_identity(tokenizer)}"
    )

    def batches(skip: int) -> Iterator[_Batch]:
        texts = (row["text"] for row in dataset)
        return _text_batches(texts, tokenizer, max_length, batch_size, skip)

    return _Corpus(identity, batches)


def _text_batches(
    texts: Iterator[str], tokenizer, max_length: int, batch_size: int, skip: int
) -> Iterator[_Batch]:
    """Tokenised, right-padded batches of `batch_size` non-empty documents, after skipping `skip`."""
    if tokenizer is None:
        raise ValueError("A text corpus needs a tokenizer.")
    texts = itertools.islice(texts, skip, None)
    while True:
        chunk, consumed = [], 0
        for text in texts:
            consumed += 1
            if text and text.strip():
                chunk.append(text)
                if len(chunk) == batch_size:
                    break
        if consumed == 0:
            return
        ids = (
            [seq for seq in tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"] if seq]
            if chunk
            else []
        )
        yield _pad(ids, consumed)


def _pad(sequences: list[list[int]], documents: int) -> _Batch:
    length = max((len(s) for s in sequences), default=0)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    return _Batch(input_ids, mask, documents)


def _sampled_corpus(
    model, tokenizer, max_length: int, batch_size: int, sample_count: int, sampling_batch_size: int
) -> _Corpus:
    """Text the model writes itself: sequences of up to `max_length` tokens from its BOS token.

    Sequences are sampled (top-k, temperature 1) ``chunk`` at a time, ``chunk`` being
    ``ceil(sample_count / max_length)`` capped at ``sampling_batch_size``. Chunk ``i`` uses seed
    ``SAMPLED_SEED + i``, so the stream is deterministic whatever ``batch_size`` the forward uses,
    and a resumed pass regenerates only the chunks it still needs. Chunks are drawn until
    ``sample_count`` real tokens (BOS up to and including the first EOS) have been seen: at least
    ``ceil(sample_count / max_length)`` sequences, more when the model stops early. The last chunk
    is only partly used, so a small chunk wastes less; a wide one decodes faster on a GPU.
    """
    if max_length < 2:
        raise ValueError(
            "The model-sampled corpus needs max_length >= 2 (a BOS token and one sampled token)."
        )
    special = _special_ids(model, tokenizer)
    chunk = max(1, min(sampling_batch_size, -(-sample_count // max_length)))
    identity = (
        f"model-sampled:top_k={SAMPLED_TOP_K}:seed={SAMPLED_SEED}:length={max_length}:chunk={chunk}:"
        f"bos={special['bos']}:eos={special['eos']}"
    )

    def batches(skip: int) -> Iterator[_Batch]:
        for index in itertools.count(skip // chunk):
            ids = _sample_sequences(model, special, max_length, chunk, SAMPLED_SEED + index).cpu()
            mask = _until_first_eos(ids, special["eos"])
            first = skip % chunk if index == skip // chunk else 0
            for start in range(first, chunk, batch_size):
                rows = slice(start, min(start + batch_size, chunk))
                yield _trim(_Batch(ids[rows], mask[rows], rows.stop - rows.start))

    return _Corpus(identity, batches)


def _trim(batch: _Batch) -> _Batch:
    """Drop columns that are padding in every row (sequences that all ended early)."""
    length = int(batch.mask.sum(dim=1).max()) if batch.mask.numel() else 0
    return _Batch(batch.input_ids[:, :length], batch.mask[:, :length], batch.documents)


def _special_ids(model, tokenizer) -> dict:
    """BOS to start from (else EOS, else PAD), the EOS ids that end a sequence, a PAD id."""
    gen = getattr(model, "generation_config", None)

    def first(name):
        for owner in (tokenizer, gen, model.config):
            value = getattr(owner, f"{name}_token_id", None) if owner is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return value
        return None

    eos_ids = {getattr(tokenizer, "eos_token_id", None)}
    for owner in (gen, model.config):
        value = getattr(owner, "eos_token_id", None)
        eos_ids.update(value if isinstance(value, list) else [value])
    eos_ids.discard(None)
    start = next((i for i in (first("bos"), first("eos"), first("pad")) if i is not None), None)
    if start is None:
        raise ValueError("Sampling a corpus from the model needs a BOS, EOS or PAD token id; none is set.")
    pad = first("pad")
    return {"bos": start, "eos": sorted(eos_ids), "pad": pad if pad is not None else start}


def _sample_sequences(model, special: dict, max_length: int, batch_size: int, seed: int) -> torch.Tensor:
    """`batch_size` sequences sampled from BOS with a fixed seed; the global RNG is left as it was.

    The model's own generation config is swapped out for the call, so its defaults (repetition
    penalty, temperature, ...) do not bend the distribution away from the model's.
    """
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device
    config = GenerationConfig(
        do_sample=True,
        top_k=SAMPLED_TOP_K,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=max_length - 1,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"] or None,
        pad_token_id=special["pad"],
    )
    prompt = torch.full((batch_size, 1), special["bos"], dtype=torch.long, device=device)
    rng_devices = [] if device.type == "cpu" else [device.index or 0]
    saved = model.generation_config
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type if rng_devices else None):
        torch.manual_seed(seed)
        model.generation_config = config
        try:
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        finally:
            model.generation_config = saved


def _until_first_eos(ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Real tokens of sampled sequences: the BOS, then everything up to and including the first EOS."""
    if not eos_ids:
        return torch.ones_like(ids, dtype=torch.bool)
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))
    is_eos[:, 0] = False  # the start token may itself be an EOS (GPT-2)
    ended_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return ~ended_before


# ----------------------------------------------------------------------------------------------
# Identities and the cache
# ----------------------------------------------------------------------------------------------


def model_identities(model: nn.Module, layout: Layout, layers: Iterable[int]) -> dict[int, str]:
    """{layer: hash of what shapes its keys}: class, name, type, embeddings and blocks up to the key.

    The keys at ``layer`` depend on the embeddings, blocks ``0..layer-1`` and block ``layer`` up to
    its MLP output projection, but not on that projection (ROME's edit target) or anything above
    it; so the hash covers exactly those weights. Block weights are hashed in full (about 1 s per
    GB, the same bytes on any device), the embedding matrix by its first rows and a strided
    sample of rows (it is large and no editing method changes it).
    """
    layers = list(layers)
    config = getattr(model, "config", None)
    header = (
        f"{type(model).__name__}|{getattr(config, 'name_or_path', '')}|{getattr(config, 'model_type', '')}"
    )
    embed = model.get_input_embeddings().weight
    unused = _params_after_blocks(model, layout) | _adapter_params(model)
    # Statistics describe the base model (they are computed with adapters disabled), so edit
    # adapters injected into it neither add parameters nor rename the wrapped ones.
    fingerprints = {
        name.replace(".base_layer.", "."): _embedding_fingerprint(p) if p is embed else _weight_fingerprint(p)
        for name, p in model.named_parameters()
        if name not in unused and _before_key(layout, max(layers), name.replace(".base_layer.", "."))
    }
    result = {}
    for layer in layers:
        digest = hashlib.sha256(header.encode())
        for name, fingerprint in fingerprints.items():
            if _before_key(layout, layer, name):
                digest.update(f"{name}:{fingerprint};".encode())
        result[layer] = digest.hexdigest()
    return result


def _adapter_params(model: nn.Module) -> set[str]:
    """Names of the parameters that adapter layers (peft tuner layers) add beside their base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = {id(p) for p in module.get_base_layer().parameters()}
            names |= {f"{prefix}.{n}" for n, p in module.named_parameters() if id(p) not in base}
    return names


def _params_after_blocks(model: nn.Module, layout: Layout) -> set[str]:
    """Names of the final norm's and LM head's parameters (unless tied to the input embeddings)."""
    modules = [model.get_output_embeddings()]
    if layout.final_norm:
        modules.append(model.get_submodule(layout.final_norm))
    after = {id(p) for m in modules if m is not None for p in m.parameters()}
    after -= {id(p) for p in model.get_input_embeddings().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in after}


def _before_key(layout: Layout, layer: int, name: str) -> bool:
    """Whether a parameter outside the head can change the input of block `layer`'s MLP output projection."""
    blocks = f"{layout.layers}."
    if not name.startswith(blocks):
        return True
    index, _, inner = name[len(blocks) :].partition(".")
    return int(index) < layer or (int(index) == layer and not inner.startswith(f"{layout.mlp_out}."))


def _weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of shape, dtype and every byte (an offloaded "meta" weight: shape and dtype only)."""
    digest = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}".encode())
    if weight.device.type != "meta":
        digest.update(_tensor_bytes(weight))
    return digest.hexdigest()


def _embedding_fingerprint(weight: torch.Tensor) -> str:
    """Cheap for a large vocabulary: the first rows, then every k-th row."""
    rows = weight[:_EMBED_ROWS], weight[:: max(1, weight.shape[0] // _EMBED_ROWS)]
    return (
        _weight_fingerprint(torch.cat(rows)) if weight.device.type != "meta" else _weight_fingerprint(weight)
    )


def _tensor_bytes(tensor: torch.Tensor):
    """The raw bytes, as a buffer (no copy on the CPU); works for bfloat16, which numpy lacks."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _tokenizer_identity(tokenizer) -> str:
    """What decides the tokens a text becomes: the tokenizer's definition and a probe's ids.

    A fast tokenizer serialises itself (vocabulary, merges, normalisation, templates) in a few
    tens of ms; its truncation and padding settings are left out, because every call with
    ``truncation=True`` changes them. Other tokenizers contribute their vocabulary. The probe
    catches Python-side settings (such as adding a BOS token).
    """
    if tokenizer is None:
        return "no-tokenizer"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None), definition.pop("padding", None)
    else:
        definition = sorted(tokenizer.get_vocab().items())
    probe = tokenizer(_PROBE_TEXT)["input_ids"]
    return _sha256(json.dumps([type(tokenizer).__name__, probe, definition], ensure_ascii=False))[:16]


@dataclass
class _CacheFiles:
    """Where the results of one call live: one file per layer, one checkpoint per pass."""

    folder: Path
    tag: str
    model_ids: dict[int, str]
    corpus_id: str
    settings: dict

    def key(self, layer: int) -> str:
        parts = [FORMAT_VERSION, self.model_ids[layer], layer, self.corpus_id, self.settings]
        return _sha256(json.dumps(parts, sort_keys=True))

    def final(self, layer: int) -> Path:
        return self.folder / f"{self.tag}-L{layer}-{self.key(layer)[:24]}.safetensors"

    def partial(self, layers: list[int]) -> Path:
        pass_key = _sha256(json.dumps([self.key(layer) for layer in layers]))[:24]
        return self.folder / f"{self.tag}-L{'-'.join(map(str, layers))}-{pass_key}.partial.safetensors"

    def load(self, layer: int) -> torch.Tensor | None:
        """The cached C, or None when absent or unreadable (then it is recomputed)."""
        path = self.final(layer)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("C")
        except Exception as err:
            warnings.warn(f"Ignoring unreadable statistics cache file {path}: {err}", stacklevel=3)
            return None

    def save(self, means: dict[int, torch.Tensor], meta: dict[str, str]) -> None:
        for layer, mean in means.items():
            info = {
                **meta,
                **self.settings,
                "layer": layer,
                "model": self.model_ids[layer],
                "corpus": self.corpus_id,
            }
            _atomic_save({"C": mean}, self.final(layer), info)


def _model_tag(model: nn.Module) -> str:
    """A readable file-name prefix: the last part of the model's name, or its type."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or "model")
    return re.sub(r"[^\w.-]", "_", name.rstrip("/").rsplit("/", 1)[-1])[:48] or "model"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp,
            metadata={k: str(v) for k, v in metadata.items()},
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
