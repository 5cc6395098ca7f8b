"""Scores of free generation: fluency (n-gram entropy) and consistency (does the text use the new fact).

Fluency follows ROME (Meng et al., 2022): the entropy of the text's bigram and trigram
distributions, weighted 2/3 and 4/3 and averaged. Text that loops ("Rome Rome Rome ...") has few
distinct n-grams and scores low; it is the usual symptom of an edit that damaged the model.
Words are split on a simple rule (runs of word characters, or single punctuation marks), so the
numbers are close to, not identical with, ROME's NLTK tokenisation.

Consistency: ROME's "reference score" compares generated text with Wikipedia text about the new
target, which the benchmark files here do not carry. What the data does offer is prompts about
the edited subject (CounterFact's ``generation_prompts``) and the new target, so consistency here
is the share of those free generations that mention the new target (case-insensitive): does the
model, talking freely about the subject, use the new fact.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")

# ROME's weights for the bigram and trigram entropies.
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(
    text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS
) -> float:
    """Weighted mean of the entropies (bits) of the text's n-gram distributions, one per order."""
    tokens = words(text)
    weighted = []
    for n, weight in zip(orders, weights):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def mentions(text: str, answer: str) -> bool:
    """The answer occurs in the text as whole words (case-insensitive)."""
    answer = answer.strip()
    if not answer:
        return False
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, flags=re.IGNORECASE) is not None
