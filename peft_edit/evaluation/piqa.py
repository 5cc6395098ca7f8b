"""A downstream side-effect check: PIQA accuracy before and after editing.

An edit should change one fact and leave general ability alone. PIQA (Bisk et al., 2020) asks
which of two solutions achieves a physical goal; each is scored by its log-likelihood after the
goal (the sum over its tokens, as lm-evaluation-harness's ``acc``) and the likelier one is the
model's answer. Guessing scores 0.5. The questions come from ``peft_edit.data.load_piqa``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..data import PiqaExample
from .metrics import teacher_forced

# The text a solution is scored after (lm-evaluation-harness's PIQA prompt).
PROMPT = "Question: {goal}\nAnswer:"


def sample_questions(questions: Sequence[PiqaExample], n: int | None, seed: int = 0) -> list[PiqaExample]:
    """``n`` questions drawn with a fixed seed (all of them if ``n`` is None or not smaller), in file order.

    The same questions are asked before and after an edit, and across runs.
    """
    if n is None or n >= len(questions):
        return list(questions)
    if n < 0:
        raise ValueError(f"The PIQA sample size must be at least 0, got {n}.")
    keep = sorted(random.Random(seed).sample(range(len(questions)), n))
    return [questions[i] for i in keep]


def piqa_accuracy(model, tokenizer, questions: Sequence[PiqaExample], batch_size: int = 32) -> float | None:
    """Share of questions whose right solution has the higher log-likelihood; None without questions."""
    if not questions:
        return None
    prompts = [PROMPT.format(goal=q.goal) for q in questions for _ in (0, 1)]
    answers = [s for q in questions for s in (q.sol1, q.sol2)]
    scored = teacher_forced(model, tokenizer, prompts, answers, batch_size=batch_size)
    correct = 0
    for k, q in enumerate(questions):
        first, second = scored[2 * k], scored[2 * k + 1]
        choice = 0 if first.total_logprob >= second.total_logprob else 1
        correct += choice == q.label
    return correct / len(questions)
