"""The lifelong-editing sets of WISE (as shipped with EasyEdit): hallucination and temporal.

Both write a long continuation ``target_new`` after ``prompt`` (a Wikipedia passage, or the
start of a sentence about an entity) and keep one unrelated web-text pair as the neighbour
(``locality_prompt`` → ``locality_ground_truth``; left out where that answer is empty,
as in 7 of the 600 hallucination records). Temporal records also carry ``ood_rephrase``,
a differently worded passage about the same entity that WISE uses as the rephrase.
"""

from __future__ import annotations

import os

from .cases import EditCase
from .records import Record, load_file, make_request, probe_of


def _wise_case(record: Record, rephrases: list[str]) -> EditCase:
    request = make_request(
        record,
        prompt=record.text("prompt"),
        subject=record.text("subject"),
        target_new=record.text("target_new"),
    )
    return EditCase(
        case_id=record.case_id(),
        request=request,
        rephrases=rephrases,
        neighbors=probe_of(record, "locality_prompt", "locality_ground_truth"),
    )


def parse_hallucination(record: Record) -> EditCase:
    return _wise_case(record, rephrases=[])


def parse_temporal(record: Record) -> EditCase:
    return _wise_case(record, rephrases=[record.text("ood_rephrase")])


def load_hallucination(path: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """Read WISE's hallucination edit set (``hallucination-edit.json``)."""
    return load_file(path, parse_hallucination, limit)


def load_temporal(path: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """Read WISE's temporal edit set (``temporal-edit.json``)."""
    return load_file(path, parse_temporal, limit)
