"""zsRE in MEND's evaluation format (``zsre_mend_eval.json``), with EasyEdit's portability field.

A record asks the question ``src`` about ``subject``; the edit writes ``alt`` (``answers[0]`` is
the true answer). ``rephrase`` is the rephrased question; ``loc`` → ``loc_ans`` is an unrelated
Natural Questions pair, written ``"nq question: who sings ..."``: the neighbour probe drops that
tag and ends the question with ``?``. ``portability`` (present in EasyEdit's GPT-4 portability
file) gives a one-hop question whose answer follows from the edit.

zsRE questions were written by people and do not always spell the subject as ``subject`` does;
such a subject is replaced by the prompt's spelling, and records whose prompt does not name the
subject at all are skipped with a warning (see :func:`peft_edit.data.records.locate_subject`).
"""

from __future__ import annotations

import os

from .cases import EditCase, Probe
from .records import Record, load_file, make_request, probe_of

NQ_TAG = "nq question:"


def natural_question(text: str) -> str:
    """``"nq question: who sings x"`` → ``"who sings x?"``: the question as a model should see it."""
    question = text.strip()
    if question.lower().startswith(NQ_TAG):
        question = question[len(NQ_TAG) :].strip()
    return question if question.endswith("?") else question + "?"


def parse_zsre(record: Record) -> EditCase:
    request = make_request(
        record,
        prompt=record.text("src"),
        subject=record.text("subject"),
        target_new=record.text("alt"),
        target_true=record.answer("answers"),
        subject_may_differ=True,
    )
    neighbor_answer = record.answer("loc_ans")
    has_portability = record.has("portability")
    return EditCase(
        case_id=record.case_id(),
        request=request,
        rephrases=[record.text("rephrase")],
        neighbors=[Probe(natural_question(record.text("loc")), neighbor_answer)] if neighbor_answer else [],
        portability=probe_of(record, "portability.New Question", "portability.New Answer")
        if has_portability
        else [],
    )


def load_zsre(path: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """Read a zsRE file in MEND's evaluation format (optionally with EasyEdit's ``portability``)."""
    return load_file(path, parse_zsre, limit)
