"""CounterFact, in the original ROME schema or in EasyEdit's flattened schema.

ROME schema (``requested_rewrite`` with a ``"{}"`` prompt; also MEMIT's ``multi_counterfact``):
``paraphrase_prompts`` become rephrases, ``neighborhood_prompts`` neighbours that keep the true
answer, ``generation_prompts`` the fluency prompts. ``attribute_prompts`` are left out: they name
*other* subjects whose real answer already is the new target, so an edit toward that target
cannot break them and they say nothing about locality.

EasyEdit schema (``prompt`` with the subject written in): one rephrase and one neighbour
(``locality_prompt`` → ``locality_ground_truth``).
"""

from __future__ import annotations

import os

from .cases import EditCase, Probe
from .records import MalformedRecordError, Record, load_file, make_request, probe_of

__all__ = ["MalformedRecordError", "load_counterfact", "parse_counterfact"]


def _rome_case(record: Record) -> EditCase:
    true = record.text("requested_rewrite.target_true.str")
    request = make_request(
        record,
        prompt=record.text("requested_rewrite.prompt"),
        subject=record.text("requested_rewrite.subject"),
        target_new=record.text("requested_rewrite.target_new.str"),
        target_true=true,
    )
    return EditCase(
        case_id=record.case_id(),
        request=request,
        rephrases=record.texts("paraphrase_prompts"),
        neighbors=[Probe(p, true) for p in record.texts("neighborhood_prompts")],
        generation_prompts=record.texts("generation_prompts", required=False),
    )


def _easyedit_case(record: Record) -> EditCase:
    request = make_request(
        record,
        prompt=record.text("prompt"),
        subject=record.text("subject"),
        target_new=record.text("target_new"),
        target_true=record.text("ground_truth"),
    )
    return EditCase(
        case_id=record.case_id(),
        request=request,
        rephrases=[record.text("rephrase_prompt")],
        neighbors=probe_of(record, "locality_prompt", "locality_ground_truth"),
    )


def parse_counterfact(record: Record) -> EditCase:
    """One CounterFact record, in whichever of the two schemas it is written."""
    return _rome_case(record) if record.has("requested_rewrite") else _easyedit_case(record)


def load_counterfact(path: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """Read a CounterFact file (ROME's ``requested_rewrite`` records or EasyEdit's flat ones)."""
    return load_file(path, parse_counterfact, limit)
