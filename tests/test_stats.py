"""Key second moments (peft_edit.stats): exactness against brute force, caching, resuming, corpora."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_model, tiny_tokenizer

from peft_edit.architectures import get_layout, mlp_out_name
from peft_edit.stats import _until_first_eos, key_second_moments, read_text_documents

TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "Rome is the capital city of Italy, and Paris is the capital city of France.",
    "",
    "Big Ben",
    "   ",
    "The Space Needle is located in the city of Seattle. " * 6,  # longer than MAX_LENGTH tokens
    "Michael Jordan plays the sport of basketball.",
    "Apple was founded by Steve Jobs.",
    "The city of Berlin is located in Germany; Madrid is located in Spain.",
    "Danielle Darrieux's mother tongue is French.",
    "Which city is the Eiffel Tower located in? It is located in Paris.",
]
MAX_LENGTH = 24
LAYERS = [1, 2]
FAMILY_TOKENIZER = {"llama": "sentencepiece", "gpt2": "bpe"}
pytestmark = pytest.mark.filterwarnings("ignore:The corpus ran out")
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext_wiki.valid.raw"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine the OpenMP hand-offs
    slow each small op by 10-100x; restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(FAMILY_TOKENIZER))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_and_tokenizer(family):
    return tiny_model(family), tiny_tokenizer(FAMILY_TOKENIZER[family])


@pytest.fixture
def llama():
    return tiny_model("llama"), tiny_tokenizer("sentencepiece")


class CallCounter:
    """Counts forward calls of a module (a pre-hook), optionally raising at call number `fail_at`."""

    def __init__(self, module, fail_at: int | None = None, on_fail=None):
        self.calls, self.fail_at, self.on_fail = 0, fail_at, on_fail
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.fail_at:
            if self.on_fail:
                self.on_fail()
            raise RuntimeError("simulated interruption")

    def remove(self):
        self.handle.remove()


def blocks(model):
    return model.get_submodule(get_layout(model).layers)


def brute_force(model, tokenizer, layers, texts, count=None):
    """mean k kᵀ in float64, running each document alone (no padding), first `count` tokens."""
    layout = get_layout(model)
    keys = {layer: [] for layer in layers}
    handles = [
        model.get_submodule(mlp_out_name(layout, layer)).register_forward_hook(
            lambda module, args, output, layer=layer: keys[layer].append(args[0][0])
        )
        for layer in layers
    ]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")[
                    "input_ids"
                ]
                if text.strip() and ids.shape[1]:
                    model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for layer in layers:
        k = torch.cat(keys[layer])[:count].double()
        result[layer] = k.T @ k / len(k)
    return result, len(torch.cat(keys[layers[0]]))


def moments(model, tokenizer, corpus=TEXTS, tmp_path=None, **kwargs):
    kwargs.setdefault("sample_count", 10_000)
    kwargs.setdefault("batch_size", 3)
    kwargs.setdefault("progress", False)
    if tmp_path is None:
        kwargs.setdefault("use_cache", False)
    return key_second_moments(
        model,
        tokenizer,
        kwargs.pop("layers", LAYERS),
        corpus,
        max_length=MAX_LENGTH,
        cache_dir=tmp_path,
        **kwargs,
    )


def test_matches_brute_force_for_two_layers_in_one_pass(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected, total = brute_force(model, tokenizer, LAYERS, TEXTS)
    first, top = CallCounter(blocks(model)[0]), CallCounter(blocks(model)[-1])
    try:
        with pytest.warns(UserWarning, match="ran out"):
            result = moments(model, tokenizer, precision=torch.float64)
    finally:
        first.remove(), top.remove()
    nonempty = sum(1 for t in TEXTS if t.strip())
    assert first.calls == -(-nonempty // 3)  # one forward per batch feeds both layers
    assert top.calls == 0  # stopped after the deepest requested layer
    for layer in LAYERS:
        assert result[layer].dtype == torch.float32 and result[layer].device.type == "cpu"
        torch.testing.assert_close(result[layer].double(), expected[layer], rtol=1e-5, atol=1e-6)
    projection = model.get_submodule(mlp_out_name(get_layout(model), LAYERS[0]))
    assert not projection._forward_pre_hooks and not projection._forward_hooks


def test_sample_count_truncation_is_exact(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    _, total = brute_force(model, tokenizer, LAYERS, TEXTS)
    count = total - 5  # ends inside the last batch
    expected, _ = brute_force(model, tokenizer, LAYERS, TEXTS, count=count)
    result = moments(model, tokenizer, tmp_path=tmp_path, sample_count=count, precision=torch.float64)
    for layer in LAYERS:
        torch.testing.assert_close(result[layer].double(), expected[layer], rtol=1e-5, atol=1e-6)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == len(LAYERS)
    meta = _metadata(files[0])
    assert meta["tokens"] == str(count) and meta["sample_count"] == str(count)
    assert meta["layer"] in {str(layer) for layer in LAYERS} and meta["corpus"].startswith("strings:")


def test_padding_does_not_change_the_result(llama):
    model, tokenizer = llama
    one = moments(model, tokenizer, batch_size=1)
    many = moments(model, tokenizer, batch_size=5)
    for layer in LAYERS:
        torch.testing.assert_close(one[layer], many[layer], rtol=1e-5, atol=1e-6)


def test_float64_and_float32_agree(llama):
    model, tokenizer = llama
    single = moments(model, tokenizer, precision=torch.float32)
    double = moments(model, tokenizer, precision=torch.float64)
    for layer in LAYERS:
        assert double[layer].dtype == torch.float32
        torch.testing.assert_close(single[layer], double[layer], rtol=1e-4, atol=1e-5)


def test_cache_hit_runs_no_forward_and_is_identical(llama, tmp_path):
    model, tokenizer = llama
    first = moments(model, tokenizer, tmp_path=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == len(LAYERS)
    fresh = tiny_model("llama")  # another object with the same weights, as in another process
    counter = CallCounter(blocks(fresh)[0])
    try:
        second = moments(fresh, tokenizer, tmp_path=tmp_path)
    finally:
        counter.remove()
    assert counter.calls == 0
    for layer in LAYERS:
        assert torch.equal(first[layer], second[layer])
    assert not list(tmp_path.glob("*.partial.*")) and not list(tmp_path.glob(".*"))


CHILD = """
import json, sys, torch
from tiny_models import tiny_model
from transformers import AutoTokenizer
from peft_edit.stats import key_second_moments
model = tiny_model("llama")
calls = []
model.model.layers[0].register_forward_pre_hook(lambda module, args: calls.append(1))
texts, tokenizer = json.loads(open(sys.argv[1]).read()), AutoTokenizer.from_pretrained(sys.argv[2])
result = key_second_moments(model, tokenizer, [1, 2], texts, sample_count=10_000, max_length=24,
                            batch_size=3, cache_dir=sys.argv[3], progress=False)
torch.save({"calls": len(calls), **result}, sys.argv[4])
"""


def test_cache_is_reused_by_another_process(llama, tmp_path):
    from transformers import AutoTokenizer

    model, tokenizer = llama
    tokenizer.save_pretrained(
        tmp_path / "tokenizer"
    )  # tokenizers trained in-process differ between processes
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    mine = moments(model, tokenizer, tmp_path=tmp_path / "cache")
    texts, out = tmp_path / "texts.json", tmp_path / "child.pt"
    texts.write_text(json.dumps(TEXTS))
    args = [
        sys.executable,
        "-c",
        CHILD,
        str(texts),
        str(tmp_path / "tokenizer"),
        str(tmp_path / "cache"),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run(args, check=True, env=env, timeout=120, capture_output=True)
    theirs = torch.load(out)
    assert theirs["calls"] == 0
    for layer in LAYERS:
        assert torch.equal(theirs[layer], mine[layer])


def test_cache_key_ignores_the_tokenizer_state_left_by_earlier_calls(llama, tmp_path):
    from transformers import AutoTokenizer

    model, tokenizer = llama
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    fresh = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")  # no truncation set yet
    moments(model, fresh, tmp_path=tmp_path / "cache")  # leaves truncation enabled in the backend
    counter = CallCounter(blocks(model)[0])
    try:
        moments(model, fresh, tmp_path=tmp_path / "cache")
    finally:
        counter.remove()
    assert counter.calls == 0


def test_different_corpus_or_settings_use_different_files(llama, tmp_path):
    model, tokenizer = llama
    moments(model, tokenizer, tmp_path=tmp_path, layers=[1])
    moments(model, tokenizer, TEXTS[:-1], tmp_path=tmp_path, layers=[1])
    moments(model, tokenizer, tmp_path=tmp_path, layers=[1], sample_count=50)
    moments(model, tokenizer, tmp_path=tmp_path, layers=[1], precision=torch.float64)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


@pytest.mark.parametrize(
    "change, recomputed",
    [
        ("model.layers.0.self_attn.q_proj.weight", True),  # shapes the keys of layer 1
        ("model.embed_tokens.weight", True),
        ("model.layers.1.mlp.down_proj.weight", False),  # ROME's target: its input is unchanged
        ("model.layers.3.mlp.up_proj.weight", False),  # above the layer
    ],
)
def test_model_identity_follows_the_weights_that_shape_the_keys(llama, tmp_path, change, recomputed):
    model, tokenizer = llama
    moments(model, tokenizer, tmp_path=tmp_path, layers=[1])
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.get_parameter(change)[:1] += 0.01
    counter = CallCounter(blocks(edited)[0])
    try:
        moments(edited, tokenizer, tmp_path=tmp_path, layers=[1])
    finally:
        counter.remove()
    assert (counter.calls > 0) == recomputed


def make_interrupted_run(model, tokenizer, tmp_path, fail_at, checkpoint_every):
    """Run until the `fail_at`-th forward raises; returns whether a checkpoint existed just before."""
    seen = {}
    counter = CallCounter(
        blocks(model)[0],
        fail_at=fail_at,
        on_fail=lambda: seen.update(before=bool(list(tmp_path.glob("*.partial.safetensors")))),
    )
    try:
        with pytest.raises(RuntimeError, match="simulated interruption"):
            moments(model, tokenizer, tmp_path=tmp_path, batch_size=2, checkpoint_every=checkpoint_every)
    finally:
        counter.remove()
    return seen["before"]


@pytest.mark.parametrize("checkpoint_every", [1, 100])
def test_resume_after_interruption_equals_uninterrupted_run(llama, tmp_path, checkpoint_every):
    model, tokenizer = llama
    with pytest.warns(UserWarning, match="ran out"):
        expected = moments(model, tokenizer, batch_size=2)
    checkpoint_before_failure = make_interrupted_run(model, tokenizer, tmp_path, 3, checkpoint_every)
    assert checkpoint_before_failure == (checkpoint_every == 1)  # periodic checkpoints
    assert len(list(tmp_path.glob("*.partial.safetensors"))) == 1  # and one on interruption
    counter = CallCounter(blocks(model)[0])
    try:
        with pytest.warns(UserWarning, match="ran out"):
            resumed = moments(model, tokenizer, tmp_path=tmp_path, batch_size=2)
    finally:
        counter.remove()
    nonempty = sum(1 for t in TEXTS if t.strip())
    assert counter.calls == -(-nonempty // 2) - 2  # the two finished batches are not redone
    for layer in LAYERS:
        assert torch.equal(resumed[layer], expected[layer])
    assert not list(tmp_path.glob("*.partial.safetensors"))
    assert not blocks(model)[0]._forward_pre_hooks


def test_identity_option_returns_identity_without_running_the_model(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    counter = CallCounter(blocks(model)[0])
    try:
        result = key_second_moments(model, tokenizer, [0, 3], "identity", cache_dir=tmp_path)
    finally:
        counter.remove()
    width = model.get_submodule(mlp_out_name(get_layout(model), 0)).weight.numel() // model.config.hidden_size
    assert counter.calls == 0 and set(result) == {0, 3}
    assert torch.equal(result[3], torch.eye(width))
    assert not list(tmp_path.iterdir())


def test_model_sampled_default_is_deterministic_psd_and_leaves_rng_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rng = torch.get_rng_state()
    kwargs = dict(sample_count=150, max_length=16, batch_size=4, use_cache=False, progress=False)
    first = key_second_moments(model, tokenizer, [1], **kwargs)[1]
    second = key_second_moments(model, tokenizer, [1], **kwargs)[1]
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(first, second)
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    torch.testing.assert_close(first, first.T)
    eigenvalues = torch.linalg.eigvalsh(first.double())
    assert eigenvalues.min() >= -1e-6 * eigenvalues.max()


def test_sampled_tokens_stop_after_the_first_eos():
    eos = 2
    ids = torch.tensor([[eos, 5, 6, eos, 7, eos], [1, 5, 6, 7, 8, 9]])  # GPT-2 starts from its EOS
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(_until_first_eos(ids, [eos]), expected)


def test_training_flags_are_restored(llama):
    model, tokenizer = llama
    model = copy.deepcopy(model).train()
    model.model.layers[0].eval()
    before = [m.training for m in model.modules()]
    moments(model, tokenizer)
    assert [m.training for m in model.modules()] == before


def test_text_file_documents_and_path_corpus(llama, tmp_path):
    path = tmp_path / "corpus.raw"
    path.write_text(
        " \n = Title = \n \n First paragraph . \n Second line . \n \n = = Section = = \n Third . \n",
        encoding="utf-8",
    )
    docs = list(read_text_documents(path))
    assert docs == ["First paragraph .\n Second line .", "Third ."]
    model, tokenizer = llama
    from_file = moments(model, tokenizer, path, sample_count=10)
    from_list = moments(model, tokenizer, docs, sample_count=10)
    for layer in LAYERS:
        assert torch.equal(from_file[layer], from_list[layer])


def test_dataset_object_uses_its_text_column(llama, tmp_path):
    class FakeDataset:  # the duck type of datasets.Dataset that stats relies on
        column_names = ["text", "id"]
        _fingerprint = "abc123"
        info = None

        def __iter__(self):
            return iter({"text": t, "id": i} for i, t in enumerate(TEXTS))

    FakeDataset.__module__ = "datasets.arrow_dataset"
    model, tokenizer = llama
    with pytest.warns(UserWarning):
        from_dataset = moments(model, tokenizer, FakeDataset(), tmp_path=tmp_path)
    with pytest.warns(UserWarning):
        from_list = moments(model, tokenizer, TEXTS)
    for layer in LAYERS:
        assert torch.equal(from_dataset[layer], from_list[layer])
    assert all("abc123" in _metadata(f)["corpus"] for f in tmp_path.glob("*.safetensors"))


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize(
    "corpus, error, message",
    [
        ("no/such/folder/corpus.txt", FileNotFoundError, "does not exist"),
        (Path("/no/such/file"), FileNotFoundError, "does not exist"),
        ("missing.raw", FileNotFoundError, "does not exist"),
        ("DIRECTORY", FileNotFoundError, "is a directory"),
        ("NOT_UTF8", ValueError, "not UTF-8"),
        ([1, 2], TypeError, "only strings"),
        ("someuser/some-dataset", ImportError, "pip install datasets"),
    ],
)
def test_bad_corpus_gives_a_clear_error(llama, tmp_path, monkeypatch, corpus, error, message):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    if corpus == "DIRECTORY":
        corpus = tmp_path
    elif corpus == "NOT_UTF8":
        corpus = tmp_path / "latin1.txt"
        corpus.write_bytes("caf\xe9\n".encode("latin-1"))
    model, tokenizer = llama
    with pytest.raises(error, match=message):
        moments(model, tokenizer, corpus, tmp_path=tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[7]), "layers"),
        (dict(layers=[]), "layers"),
        (dict(precision=torch.float16), "precision"),
        (dict(sample_count=0), "sample_count"),
    ],
)
def test_bad_arguments_fail_before_the_model_runs(llama, kwargs, message):
    model, tokenizer = llama
    counter = CallCounter(blocks(model)[0])
    try:
        with pytest.raises(ValueError, match=message):
            moments(model, tokenizer, **kwargs)
    finally:
        counter.remove()
    assert counter.calls == 0


@pytest.mark.real_model
@pytest.mark.skipif(not WIKITEXT.is_file(), reason="shared WikiText file not available")
def test_smollm2_layer5_stats_on_wikitext(tmp_path, smollm2):
    model, tokenizer = smollm2
    result = key_second_moments(
        model, tokenizer, [5], WIKITEXT, sample_count=2000, cache_dir=tmp_path, progress=False
    )
    c = result[5]
    assert c.shape == (1536, 1536)
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c, c.T)
    assert torch.diagonal(c).min() >= 0
