"""Reading benchmark records: one field-access helper and the rules every loader shares.

Every loader reads its records through :class:`Record`, so a bad record fails the same way
everywhere: a :class:`MalformedRecordError` that names the file, the record index and the field
(``"cf.json record 3: missing field 'rephrase_prompt'."``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from ..requests import PLACEHOLDER, EditRequest
from .cases import EditCase, Probe


class MalformedRecordError(ValueError):
    """A record lacks a field or has one of the wrong type; the message names file, record and field."""


class SubjectNotInPromptError(MalformedRecordError):
    """The record's subject does not occur in its prompt, not even approximately."""


class Record:
    """One record of a data file, with typed field access that reports where a field is wrong.

    ``path`` arguments are dotted (``"requested_rewrite.target_new.str"``). A field whose value
    is ``None`` counts as missing: rows read from a Hub dataset carry ``None`` for the keys that
    other rows have and this one lacks.
    """

    def __init__(self, data: Any, source: str, index: int, prefix: str = "") -> None:
        self.source = source
        self.index = index
        self.prefix = prefix
        if not isinstance(data, dict):
            at = f" at {prefix!r}" if prefix else ""
            raise MalformedRecordError(f"{self.where}: expected an object{at}, got {type(data).__name__}.")
        self.data = data

    @property
    def where(self) -> str:
        return f"{self.source} record {self.index}"

    def _name(self, path: str) -> str:
        return f"{self.prefix}.{path}" if self.prefix else path

    def error(self, path: str, problem: str) -> MalformedRecordError:
        return MalformedRecordError(f"{self.where}: field {self._name(path)!r} {problem}")

    def has(self, path: str) -> bool:
        return self.get(path, required=False) is not None

    def get(self, path: str, required: bool = True) -> Any:
        """The value at ``path``; a missing field is an error unless ``required`` is false (then None)."""
        value: Any = self.data
        for part in path.split("."):
            if not isinstance(value, dict) or value.get(part) is None:
                if required:
                    raise MalformedRecordError(f"{self.where}: missing field {self._name(path)!r}.")
                return None
            value = value[part]
        return value

    def text(self, path: str) -> str:
        """A required, non-empty string."""
        return self._check_text(path, self.get(path))

    def optional_text(self, path: str) -> str | None:
        value = self.get(path, required=False)
        return None if value is None else self._check_text(path, value)

    def _check_text(self, path: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"should be a string, got {type(value).__name__}: {_short(value)}.")
        if not value.strip():
            raise self.error(path, "is an empty string; it needs text.")
        return value

    def texts(self, path: str, required: bool = True) -> list[str]:
        """A list of non-empty strings (an empty list if the field is optional and missing)."""
        value = self.get(path, required=required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(
                path, f"should be a list of strings, got {type(value).__name__}: {_short(value)}."
            )
        return [self._check_text(f"{path}[{i}]", item) for i, item in enumerate(value)]

    def text_or_texts(self, path: str) -> list[str]:
        """A string or a list of strings, as a list; empty if the field is missing."""
        value = self.get(path, required=False)
        if isinstance(value, str):
            return [self._check_text(path, value)]
        return self.texts(path, required=False)

    def mapping(self, path: str, required: bool = True) -> dict:
        value = self.get(path, required=required)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, f"should be an object, got {type(value).__name__}: {_short(value)}.")
        return value

    def children(self, path: str, required: bool = True) -> list[Record]:
        """The objects of the list at ``path``, each a Record that names its place in error messages."""
        value = self.get(path, required=required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(
                path, f"should be a list of objects, got {type(value).__name__}: {_short(value)}."
            )
        return [
            Record(item, self.source, self.index, self._name(f"{path}[{i}]")) for i, item in enumerate(value)
        ]

    def answer(self, path: str, required: bool = True) -> str | None:
        """The first answer of an answer field, in any of the shapes the benchmarks use.

        ``"Paris"``, ``["Paris", ...]`` (several accepted answers) and ``[["Paris", "City of
        Light"], ...]`` (KnowEdit's wiki_recent: a list of answers, each a list of aliases) all give
        ``"Paris"``: the first non-blank alias of the first answer that has one. ``None`` if the
        field is optional and missing, or present but holds no text (``""``, ``[]``, ``[[]]``: a
        few KnowEdit probes do); a missing required field or a wrong type is an error.
        """
        value = self.get(path, required=required)
        if value is None:
            return None
        aliases = value if isinstance(value, list) else [value]
        for i, item in enumerate(aliases):
            for alias in item if isinstance(item, list) else [item]:
                if not isinstance(alias, str):
                    raise self.error(
                        path,
                        f"should hold strings (or lists of strings), got {type(alias).__name__} at [{i}].",
                    )
                if alias.strip():
                    return alias
        return None

    def case_id(self) -> str:
        """The record's own ``case_id`` if it has one, else its index in the file."""
        value = self.get("case_id", required=False)
        return str(self.index if value is None else value)


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# --- files ------------------------------------------------------------------------------------


def read_json_records(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON file holding a list, or of a JSON-lines file (``.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {str(path)!r}.")
    if path.suffix == ".jsonl":
        return [_json_line(path, i, line) for i, line in enumerate(_nonblank_lines(path))]
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MalformedRecordError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(records, list):
        raise MalformedRecordError(
            f"{path}: expected a JSON list of records, got a {type(records).__name__}."
        )
    return records


def _nonblank_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_line(path: Path, index: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise MalformedRecordError(f"{path.name} record {index}: not valid JSON ({err}).") from err


def records_of(items, source: str) -> Iterator[Record]:
    """Wrap raw records (dicts, from a file or a Hub dataset) as :class:`Record`s named after ``source``."""
    for index, item in enumerate(items):
        yield Record(item, source, index)


def probe_of(record: Record, prompt_path: str, answer_path: str) -> list[Probe]:
    """The probe ``prompt`` → first answer, as a list of one; empty if the answer field holds no text.

    A few real records have an empty expected answer (``""`` or ``[[]]``); such a probe cannot be
    scored, so it is left out rather than failing the whole file.
    """
    answer = record.answer(answer_path)
    return [] if answer is None else [Probe(record.text(prompt_path), answer)]


# --- edit requests ----------------------------------------------------------------------------

_WORD_CHAR = re.compile(r"\w")


def locate_subject(prompt: str, subject: str) -> str | None:
    """How ``prompt`` spells ``subject``, when it spells it differently; None if it does not name it.

    Questions written by people (zsRE) do not always repeat the subject verbatim: "Raja Zarith
    Sofia's father" for the subject "Raja Zarith Sofiah". The answer is, in order: the subject
    itself; the same text in other letter case; else the longest run of whole words of the prompt
    that also occurs in the subject, if it covers at least half of the subject's characters.
    """
    if subject in prompt:
        return subject
    start = prompt.lower().find(subject.lower())
    if start >= 0:
        return prompt[start : start + len(subject)]
    match = SequenceMatcher(None, prompt.lower(), subject.lower(), autojunk=False).find_longest_match(
        0, len(prompt), 0, len(subject)
    )
    span = _whole_words(prompt, match.a, match.a + match.size)
    return span if span and 2 * len(span) >= len(subject) else None


def _whole_words(text: str, start: int, end: int) -> str:
    """``text[start:end]`` shrunk to begin and end on word boundaries, without outer spaces/punctuation."""
    while start < end and start > 0 and _WORD_CHAR.match(text[start - 1]) and _WORD_CHAR.match(text[start]):
        start += 1
    while end > start and end < len(text) and _WORD_CHAR.match(text[end]) and _WORD_CHAR.match(text[end - 1]):
        end -= 1
    return text[start:end].strip(" \t\n,.;:!?'\"()")


def make_request(
    record: Record,
    prompt: str,
    subject: str,
    target_new: str,
    target_true: str | None = None,
    subject_may_differ: bool = False,
) -> EditRequest:
    """An :class:`EditRequest` from a record's fields, with the rules every loader applies.

    * ``target_true`` equal to ``target_new`` (zsRE and KnowEdit have such records: the "new"
      answer is the one the fact already has) is dropped: the request still asks for
      ``target_new``, but there is no competing answer to compare against.
    * ``subject_may_differ``: for datasets of human-written questions, a subject the prompt spells
      differently is replaced by the prompt's spelling (:func:`locate_subject`); if the prompt does
      not name it at all, :class:`SubjectNotInPromptError` is raised.
    """
    if target_true is not None and target_true.strip() == target_new.strip():
        target_true = None
    if subject_may_differ and PLACEHOLDER not in prompt and subject not in prompt:
        spelled = locate_subject(prompt, subject)
        if spelled is None:
            raise SubjectNotInPromptError(
                f"{record.where}: the subject {subject!r} does not occur in the prompt {prompt!r}."
            )
        subject = spelled
    try:
        return EditRequest(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true)
    except (TypeError, ValueError) as err:
        raise MalformedRecordError(f"{record.where}: {err}") from err


# --- records to cases -------------------------------------------------------------------------


def parse_cases(records: Iterable[Record], parse: Callable[[Record], EditCase], limit: int | None = None):
    """``parse`` each record into an :class:`EditCase`, stopping after ``limit`` cases.

    A record whose subject cannot be found in its prompt (see :func:`make_request`) is skipped,
    and one warning lists every skipped record; any other bad record raises.
    """
    cases: list[EditCase] = []
    skipped: list[int] = []
    source = ""
    for record in records:
        if limit is not None and len(cases) >= limit:
            break
        source = record.source
        try:
            cases.append(parse(record))
        except SubjectNotInPromptError:
            skipped.append(record.index)
    if skipped:
        shown = ", ".join(map(str, skipped[:20])) + (", ..." if len(skipped) > 20 else "")
        warnings.warn(
            f"{source}: skipped {len(skipped)} record(s) whose subject does not occur in the prompt "
            f"(records {shown}).",
            stacklevel=3,
        )
    return cases


def load_file(path: str | os.PathLike, parse: Callable[[Record], EditCase], limit: int | None = None):
    """The cases of a local JSON / JSON-lines file, each record read by ``parse``."""
    path = Path(path)
    return parse_cases(records_of(read_json_records(path), path.name), parse, limit)
