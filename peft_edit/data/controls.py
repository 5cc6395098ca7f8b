"""Control sets that are not edits: ROME's known facts and PIQA, for locality and downstream checks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .cases import Probe
from .records import MalformedRecordError, Record, read_json_records, records_of


def _first(records, limit: int | None):
    for record in records:
        if limit is not None and record.index >= limit:
            return
        yield record


def load_known_facts(path: str | os.PathLike, limit: int | None = None) -> list[Probe]:
    """ROME's ``known_1000.json``: facts a model knows, as probes ``prompt`` → ``attribute``.

    The prompt is the record's filled-in ``prompt`` (``"Vinson Massif is located in the
    continent of"``), whose expected continuation is the known ``attribute`` (``"Antarctica"``).
    """
    path = Path(path)
    records = records_of(read_json_records(path), path.name)
    return [Probe(r.text("prompt"), r.text("attribute")) for r in _first(records, limit)]


@dataclass(frozen=True)
class PiqaExample:
    """A PIQA question: the ``goal`` and two solutions; ``label`` (0 or 1) marks the right one."""

    goal: str
    sol1: str
    sol2: str
    label: int


def load_piqa(
    path: str | os.PathLike, limit: int | None = None, labels_path: str | os.PathLike | None = None
) -> list[PiqaExample]:
    """Read PIQA: a JSON list of ``{goal, sol1, sol2, label}``, or the upstream pair of files.

    The upstream release keeps the labels apart: ``valid.jsonl`` (``{goal, sol1, sol2}`` per line)
    and ``valid-labels.lst`` (``0``/``1`` per line). For a ``.jsonl`` path the labels are read from
    ``labels_path``, by default the file next to it named ``<stem>-labels.lst``.
    """
    path = Path(path)
    raw = read_json_records(path)
    if path.suffix == ".jsonl":
        labels_file = (
            Path(labels_path) if labels_path is not None else path.with_name(f"{path.stem}-labels.lst")
        )
        raw = _attach_labels(raw, path, labels_file)
    return [_piqa_example(r) for r in _first(records_of(raw, path.name), limit)]


def _attach_labels(raw: list, path: Path, labels_file: Path) -> list:
    if not labels_file.is_file():
        raise FileNotFoundError(
            f"No PIQA labels file at {str(labels_file)!r} for {str(path)!r}; pass labels_path=... "
            "(one 0/1 per line)."
        )
    labels = [line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(raw):
        raise MalformedRecordError(
            f"{labels_file.name} has {len(labels)} labels but {path.name} has {len(raw)} records; "
            "they must be aligned line by line."
        )
    bad = next((i for i, label in enumerate(labels) if label not in ("0", "1")), None)
    if bad is not None:
        raise MalformedRecordError(f"{labels_file.name} line {bad}: label {labels[bad]!r} should be 0 or 1.")
    return [
        {**item, "label": int(label)} if isinstance(item, dict) else item for item, label in zip(raw, labels)
    ]


def _piqa_example(record: Record) -> PiqaExample:
    label = record.get("label")
    if isinstance(label, bool) or label not in (0, 1):
        raise record.error("label", f"should be 0 or 1, got {label!r}.")
    return PiqaExample(record.text("goal"), record.text("sol1"), record.text("sol2"), int(label))
