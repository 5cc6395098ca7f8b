"""MQuAKE (``MQuAKE-CF``, ``MQuAKE-CF-3k``, ``MQuAKE-T`` and subsets): multi-hop questions over several edits.

A case holds up to four ``requested_rewrite`` entries in ROME form; all of them are applied
together: the first is :attr:`EditCase.request`, the others :attr:`EditCase.extra_requests`.
The first edit's ``question`` is its rephrase. The multi-hop ``questions`` are portability
probes whose answer after the edits is ``new_answer``. MQuAKE has no locality probes.
"""

from __future__ import annotations

import os

from .cases import EditCase, Probe
from .records import MalformedRecordError, Record, load_file, make_request


def _rewrite_request(record: Record, rewrite: Record):
    return make_request(
        record,
        prompt=rewrite.text("prompt"),
        subject=rewrite.text("subject"),
        target_new=rewrite.text("target_new.str"),
        target_true=rewrite.optional_text("target_true.str"),
    )


def parse_mquake(record: Record) -> EditCase:
    rewrites = record.children("requested_rewrite")
    if not rewrites:
        raise MalformedRecordError(f"{record.where}: field 'requested_rewrite' is an empty list.")
    requests = [_rewrite_request(record, rewrite) for rewrite in rewrites]
    first_question = rewrites[0].optional_text("question")
    new_answer = record.text("new_answer")
    return EditCase(
        case_id=record.case_id(),
        request=requests[0],
        extra_requests=requests[1:],
        rephrases=[first_question] if first_question else [],
        portability=[Probe(question, new_answer) for question in record.texts("questions")],
    )


def load_mquake(path: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """Read a MQuAKE file (the original ``requested_rewrite`` list format)."""
    return load_file(path, parse_mquake, limit)
