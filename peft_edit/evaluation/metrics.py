"""Batched probes behind the three families of numbers the field reports.

* **teacher-forced**: the prompt followed by the answer's tokens; at each answer position, is
  the model's argmax the answer token (EasyEdit's "rewrite/rephrase acc"), and which token is it
  (locality compares these before and after the edit);
* **probability**: the mean log-probability of the answer's tokens, compared between the new and
  the true answer (ROME/MEMIT's efficacy, paraphrase and neighborhood scores);
* **generation**: greedy decoding from the prompt; does the text start with the answer, or is it
  unchanged by the edit (the "wild" protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..requests import pad_token_id, tokenize_continuation


@dataclass
class TeacherForced:
    """One (prompt, answer) pair scored with the answer given."""

    answer_ids: list[int]
    logprobs: list[float]  # log P(answer token | prompt, earlier answer tokens)
    argmax_ids: list[int]  # the model's top token at each of those positions

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def token_accuracy(self) -> float:
        return sum(a == t for a, t in zip(self.argmax_ids, self.answer_ids)) / len(self.answer_ids)


@torch.no_grad()
def teacher_forced(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> list[TeacherForced]:
    """Score every answer after its prompt, ``batch_size`` pairs per forward pass (right padding)."""
    encoded = [tokenize_continuation(tokenizer, p, a) for p, a in zip(prompts, answers)]
    device = next(model.parameters()).device
    results: list[TeacherForced] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        rows = [p + a for p, a in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for i, (p, a) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(a), device=logp.device)
            answer = torch.tensor(a, device=logp.device)
            results.append(
                TeacherForced(
                    answer_ids=list(a),
                    logprobs=logp[i, positions, answer].tolist(),
                    argmax_ids=logp[i, positions].argmax(-1).tolist(),
                )
            )
    return results


@torch.no_grad()
def greedy_continuations(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int | Sequence[int], batch_size: int = 32
) -> list[str]:
    """Greedy text after each prompt (left padding, so every row continues from its last token)."""
    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad_token_id(tokenizer)] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        steps = max(lengths[start : start + batch_size])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=pad_token_id(tokenizer),
        )
        for row, n in zip(out[:, width:], lengths[start : start + batch_size]):
            outputs.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return outputs


def starts_with_answer(text: str, answer: str) -> bool:
    """Generation exact match: the output, stripped, begins with the answer (case-sensitive)."""
    return text.strip().startswith(answer.strip())
