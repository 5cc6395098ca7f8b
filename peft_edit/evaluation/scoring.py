"""Per-case scores: every probe of many cases run in a few batched calls, then turned into metrics.

A case's probes are the edit prompts (reliability), its rephrases (generalization), its
neighbours (locality), its portability questions and its generation prompts (fluency,
consistency). :func:`run_probes` runs the probes of all given cases together (teacher-forced
rows in one batched call, greedy generations in another), so scoring many cases on one model
costs a handful of forward passes per batch, not a few per case; greedy answers that the
teacher-forced pass already determines are read from it instead of decoded again.
:func:`case_metrics` turns one case's outputs into its numbers, comparing with the unedited
model's outputs for locality.

Metric names say what is measured and how (see ``METRICS``); a metric the case's data cannot
give (no rephrases, no ``target_true``, no portability questions, ...) is ``None``, never 0.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..data.cases import EditCase
from .fluency import mentions, ngram_entropy
from .metrics import (
    TeacherForced,
    greedy_continuations,
    prefers,
    starts_with_answer,
    teacher_forced,
    unchanged_fraction,
)

# name -> what it measures. The suffix says how: _tf teacher-forced token accuracy (EasyEdit),
# _prob probability comparison (ROME/MEMIT), _gen greedy generation.
METRICS: dict[str, str] = {
    "reliability_tf": "edit prompts: share of target_new tokens that are the argmax, teacher-forced",
    "generalization_tf": "rephrased prompts: share of target_new tokens that are the argmax, teacher-forced",
    "locality_tf": "neighbour prompts: share of answer positions whose argmax token is unchanged by the edit",
    "portability_tf": "portability questions: share of answer tokens that are the argmax, teacher-forced",
    "efficacy_prob": "edit prompts: P(target_new) > P(target_true) (mean token log-probability)",
    "paraphrase_prob": "rephrased prompts: P(target_new) > P(target_true)",
    "neighborhood_prob": "neighbour prompts: P(neighbour's answer) > P(target_new)",
    "reliability_gen": "edit prompts: greedy output starts with target_new",
    "generalization_gen": "rephrased prompts: greedy output starts with target_new",
    "locality_gen": "neighbour prompts: greedy output (answer-length) unchanged by the edit",
    "portability_gen": "portability questions: greedy output starts with the expected answer",
    "fluency": "generation prompts: weighted bi/tri-gram entropy of the greedy text (ROME)",
    "consistency": "generation prompts: share of greedy texts that mention target_new",
}


@dataclass
class ScoreSettings:
    """How probes are run: batch size, and how many tokens free generation gets (0: skip fluency)."""

    batch_size: int = 32
    generation_tokens: int = 64
    cases_per_chunk: int = 64  # cases whose probes go through the model together (bounds memory)


@dataclass
class CaseOutputs:
    """What the model produced on one case's probes, keyed by (kind, index, answer)."""

    forced: dict[tuple, TeacherForced] = field(default_factory=dict)
    generated: dict[tuple, str] = field(default_factory=dict)


def _forced_probes(case: EditCase) -> list[tuple[tuple, str, str]]:
    """(key, prompt, answer) of every teacher-forced row of a case."""
    main = case.request
    rows = []
    for j, r in enumerate(case.requests):
        rows.append((("edit", j, "new"), r.filled_prompt, r.target_new))
        if r.target_true is not None:
            rows.append((("edit", j, "true"), r.filled_prompt, r.target_true))
    for j, prompt in enumerate(case.rephrases):
        rows.append((("rephrase", j, "new"), prompt, main.target_new))
        if main.target_true is not None:
            rows.append((("rephrase", j, "true"), prompt, main.target_true))
    for j, probe in enumerate(case.neighbors):
        rows.append((("neighbor", j, "keep"), probe.prompt, probe.answer))
        if probe.answer.strip() != main.target_new.strip():
            rows.append((("neighbor", j, "new"), probe.prompt, main.target_new))
    for j, probe in enumerate(case.portability):
        rows.append((("portability", j, "new"), probe.prompt, probe.answer))
    return rows


def _generation_probes(case: EditCase, forced: dict[tuple, TeacherForced], tokens: int):
    """(key, prompt, max_new_tokens): answer probes get as many tokens as their answer has."""
    rows = []
    for j, r in enumerate(case.requests):
        rows.append((("edit", j), r.filled_prompt, len(forced[("edit", j, "new")].answer_ids)))
    for j, prompt in enumerate(case.rephrases):
        rows.append((("rephrase", j), prompt, len(forced[("rephrase", j, "new")].answer_ids)))
    for j, probe in enumerate(case.neighbors):
        rows.append((("neighbor", j), probe.prompt, len(forced[("neighbor", j, "keep")].answer_ids)))
    for j, probe in enumerate(case.portability):
        rows.append((("portability", j), probe.prompt, len(forced[("portability", j, "new")].answer_ids)))
    if tokens > 0:
        # CounterFact repeats generation prompts; each distinct one is generated once.
        for j, prompt in enumerate(dict.fromkeys(case.generation_prompts)):
            rows.append((("generation", j), prompt, tokens))
    return rows


# The teacher-forced row whose answer an answer probe's greedy continuation is as long as.
_ANSWER_ROW = {"edit": "new", "rephrase": "new", "neighbor": "keep", "portability": "new"}


def greedy_from_forced(forced: dict[tuple, TeacherForced], key: tuple, prompt: str) -> list[int] | None:
    """The greedy tokens of an answer probe when the teacher-forced pass already determines them.

    Greedy decoding feeds the model its own argmax; teacher forcing feeds the answer. While the
    two agree, the contexts are the same, so if the argmax tokens match the answer at every
    position but possibly the last, the greedy continuation (as long as the answer) is exactly
    those argmax tokens and the model need not run again. Returns None when decoding is needed,
    and when the prompt ends with a space: generation drops it, and so does the teacher-forced pass
    but before an answer that starts a new line, which this cannot tell from the token ids.
    """
    kind, index = key
    if kind not in _ANSWER_ROW or prompt.endswith(" "):
        return None
    scored = forced[(kind, index, _ANSWER_ROW[kind])]
    n = len(scored.answer_ids)
    if scored.argmax_ids[: n - 1] != scored.answer_ids[: n - 1]:
        return None
    return scored.argmax_ids


def run_probes(
    model,
    tokenizer,
    cases: Sequence[EditCase],
    settings: ScoreSettings | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[CaseOutputs]:
    """Run every probe of ``cases`` on ``model`` (batched across cases); one ``CaseOutputs`` per case."""
    settings = settings or ScoreSettings()
    outputs = [CaseOutputs() for _ in cases]
    step = settings.cases_per_chunk
    chunks = range(0, len(cases), step)
    for start in tqdm(chunks, desc=desc, disable=not progress or len(chunks) < 2, leave=False):
        chunk = list(range(start, min(start + step, len(cases))))
        forced = [(i, key, p, a) for i in chunk for key, p, a in _forced_probes(cases[i])]
        scored = teacher_forced(
            model, tokenizer, [p for *_, p, _ in forced], [a for *_, a in forced], settings.batch_size
        )
        for (i, key, _, _), s in zip(forced, scored):
            outputs[i].forced[key] = s
        to_generate = []
        for i in chunk:
            for key, prompt, n in _generation_probes(cases[i], outputs[i].forced, settings.generation_tokens):
                known = greedy_from_forced(outputs[i].forced, key, prompt)
                if known is None:
                    to_generate.append((i, key, prompt, n))
                else:
                    outputs[i].generated[key] = tokenizer.decode(known, skip_special_tokens=True)
        texts = greedy_continuations(
            model,
            tokenizer,
            [p for _, _, p, _ in to_generate],
            [n for *_, n in to_generate],
            settings.batch_size,
        )
        for (i, key, _, _), text in zip(to_generate, texts):
            outputs[i].generated[key] = text
    return outputs


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def case_metrics(case: EditCase, out: CaseOutputs, before: CaseOutputs) -> dict[str, float | None]:
    """One case's numbers; ``before`` is the unedited model's outputs on the same case (for locality).

    Passing ``out`` as ``before`` gives the unedited model's own scores (locality is then 1 by
    definition).
    """
    f, g = out.forced, out.generated
    main = case.request
    reqs = list(enumerate(case.requests))
    rephrases = range(len(case.rephrases))
    neighbors = range(len(case.neighbors))
    portability = range(len(case.portability))
    texts = [text for key, text in g.items() if key[0] == "generation"]
    return {
        "reliability_tf": _mean([f[("edit", j, "new")].token_accuracy for j, _ in reqs]),
        "generalization_tf": _mean([f[("rephrase", j, "new")].token_accuracy for j in rephrases]),
        "locality_tf": _mean(
            [
                unchanged_fraction(
                    before.forced[("neighbor", j, "keep")].argmax_ids, f[("neighbor", j, "keep")].argmax_ids
                )
                for j in neighbors
            ]
        ),
        "portability_tf": _mean([f[("portability", j, "new")].token_accuracy for j in portability]),
        "efficacy_prob": _mean(
            [
                float(prefers(f[("edit", j, "new")], f[("edit", j, "true")]))
                for j, _ in reqs
                if ("edit", j, "true") in f
            ]
        ),
        "paraphrase_prob": _mean(
            [
                float(prefers(f[("rephrase", j, "new")], f[("rephrase", j, "true")]))
                for j in rephrases
                if ("rephrase", j, "true") in f
            ]
        ),
        "neighborhood_prob": _mean(
            [
                float(prefers(f[("neighbor", j, "keep")], f[("neighbor", j, "new")]))
                for j in neighbors
                if ("neighbor", j, "new") in f
            ]
        ),
        "reliability_gen": _mean([float(starts_with_answer(g[("edit", j)], r.target_new)) for j, r in reqs]),
        "generalization_gen": _mean(
            [float(starts_with_answer(g[("rephrase", j)], main.target_new)) for j in rephrases]
        ),
        "locality_gen": _mean(
            [float(g[("neighbor", j)] == before.generated[("neighbor", j)]) for j in neighbors]
        ),
        "portability_gen": _mean(
            [
                float(starts_with_answer(g[("portability", j)], case.portability[j].answer))
                for j in portability
            ]
        ),
        "fluency": _mean([ngram_entropy(t) for t in texts]),
        "consistency": _mean([float(mentions(t, main.target_new)) for t in texts]),
    }


def summarize(records: Sequence[dict], keys: Sequence[str] = tuple(METRICS)) -> dict[str, float | None]:
    """Mean of each metric over the records that have it; ``None`` where no record does."""
    return {k: _mean([r[k] for r in records if r.get(k) is not None]) for k in keys}
