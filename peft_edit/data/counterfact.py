"""CounterFact, in the original ROME schema or in EasyEdit's flattened schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..requests import EditRequest
from .cases import EditCase, Probe


class MalformedRecordError(ValueError):
    """A record lacks a field or has one of the wrong type; the message names file, record and field."""


def _field(record: dict, path: str, where: str):
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MalformedRecordError(f"{where}: missing field {path!r}.")
        value = value[part]
    return value


def _rome_case(record: dict, where: str) -> EditCase:
    true = _field(record, "requested_rewrite.target_true.str", where)
    request = EditRequest(
        prompt=_field(record, "requested_rewrite.prompt", where),
        subject=_field(record, "requested_rewrite.subject", where),
        target_new=_field(record, "requested_rewrite.target_new.str", where),
        target_true=true,
    )
    return EditCase(
        case_id=str(record.get("case_id", where)),
        request=request,
        rephrases=list(_field(record, "paraphrase_prompts", where)),
        neighbors=[Probe(p, true) for p in _field(record, "neighborhood_prompts", where)],
    )


def _easyedit_case(record: dict, where: str) -> EditCase:
    request = EditRequest(
        prompt=_field(record, "prompt", where),
        subject=_field(record, "subject", where),
        target_new=_field(record, "target_new", where),
        target_true=_field(record, "ground_truth", where),
    )
    return EditCase(
        case_id=str(record.get("case_id", where)),
        request=request,
        rephrases=[_field(record, "rephrase_prompt", where)],
        neighbors=[
            Probe(_field(record, "locality_prompt", where), _field(record, "locality_ground_truth", where))
        ],
    )


def load_counterfact(path: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """Read a CounterFact file (ROME's ``requested_rewrite`` records or EasyEdit's flat ones)."""
    path = Path(path)
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise MalformedRecordError(f"{path}: expected a JSON list of records.")
    cases = []
    for i, record in enumerate(records[:limit] if limit else records):
        where = f"{path.name} record {i}"
        if not isinstance(record, dict):
            raise MalformedRecordError(f"{where}: expected an object, got {type(record).__name__}.")
        try:
            case = (
                _rome_case(record, where) if "requested_rewrite" in record else _easyedit_case(record, where)
            )
        except (TypeError, ValueError) as err:
            if isinstance(err, MalformedRecordError):
                raise
            raise MalformedRecordError(f"{where}: {err}") from err
        cases.append(case)
    return cases
