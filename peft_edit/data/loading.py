"""One entry point for every benchmark: ``load_cases("FORMAT:PATH_OR_HUB_ID")``.

``PATH_OR_HUB_ID`` is a local JSON / JSON-lines file, or a Hugging Face Hub dataset:

* ``owner/name`` – the ``train`` split of the dataset;
* ``owner/name@test`` – another split (``datasets`` slicing works too: ``@train[:500]``);
* ``owner/name/dir/file.json`` – one data file of the dataset repository (how the editing
  benchmarks are usually published), optionally ``@split`` as well.

A path that exists locally is always read as a local file. Without ``FORMAT:`` the format is
told from the fields of the first record.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cases import EditCase
from .counterfact import parse_counterfact
from .knowedit import (
    parse_knowedit_convsent,
    parse_knowedit_wiki_counterfact,
    parse_knowedit_wiki_recent,
    parse_knowedit_wikibio,
    parse_knowedit_zsre,
)
from .mquake import parse_mquake
from .records import Record, parse_cases, read_json_records, records_of
from .wise import parse_hallucination, parse_temporal
from .zsre import parse_zsre

Parser = Callable[[Record], EditCase]

_PARSERS: dict[str, tuple[Parser, str]] = {
    "counterfact": (
        parse_counterfact,
        "CounterFact, ROME schema (requested_rewrite) or EasyEdit's flat schema",
    ),
    "zsre": (parse_zsre, "zsRE in MEND's eval format (src/alt/rephrase/loc), optional one-hop portability"),
    "knowedit-zsre": (parse_knowedit_zsre, "KnowEdit ZsRE: rephrase, locality and portability probes"),
    "knowedit-wiki-counterfact": (parse_knowedit_wiki_counterfact, "KnowEdit wiki_counterfact"),
    "knowedit-wiki-recent": (
        parse_knowedit_wiki_recent,
        "KnowEdit wiki_recent (no ground truth; alias lists)",
    ),
    "knowedit-wikibio": (parse_knowedit_wikibio, "KnowEdit WikiBio: a passage continued by a new sentence"),
    "knowedit-convsent": (parse_knowedit_convsent, "KnowEdit ConvSent: a positive opinion about an entity"),
    "mquake": (parse_mquake, "MQuAKE: several edits per case, multi-hop questions as portability"),
    "hallucination": (parse_hallucination, "WISE hallucination set: a Wikipedia passage continued"),
    "temporal": (
        parse_temporal,
        "WISE temporal set: an entity described, with an out-of-distribution rephrase",
    ),
}

FORMATS: dict[str, str] = {name: description for name, (_, description) in _PARSERS.items()}
"""Every format ``load_cases`` reads, with a one-line description (for ``--help`` texts)."""

DEFAULT_HUB_SPLIT = "train"
_DATA_FILE = re.compile(r"\.(json|jsonl|lst|csv|parquet|txt)$", re.IGNORECASE)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[^@]+))?(?:@(?P<split>.+))?$")


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face Hub, as ``owner/name[/file][@split]`` names it."""

    repo: str
    data_file: str | None = None
    split: str = DEFAULT_HUB_SPLIT

    def __str__(self) -> str:
        return self.repo + (f"/{self.data_file}" if self.data_file else "") + f"@{self.split}"


def load_cases(spec: str | os.PathLike, limit: int | None = None) -> list[EditCase]:
    """The edit cases named by ``spec``: ``"FORMAT:PATH_OR_HUB_ID"`` or a bare path / Hub id.

    See :data:`FORMATS` for the formats. ``limit`` keeps the first ``limit`` cases.
    """
    format_name, location = split_spec(spec)
    items, source = _read(location)
    if format_name is None:
        format_name = detect_format(items, source)
    parse, _ = _PARSERS[format_name]
    return parse_cases(records_of(items, source), parse, limit)


def split_spec(spec: str | os.PathLike) -> tuple[str | None, str]:
    """``"mquake:data/x.json"`` → ``("mquake", "data/x.json")``; a bare path gives ``(None, path)``."""
    text = os.fspath(spec)
    if Path(text).exists():
        return None, text
    prefix, colon, rest = text.partition(":")
    if not colon or len(prefix) == 1:  # no prefix, or a Windows drive letter
        return None, text
    if prefix not in _PARSERS:
        raise ValueError(f"Unknown data format {prefix!r} in {text!r}; known formats: {', '.join(_PARSERS)}.")
    return prefix, rest


def parse_hub_id(location: str) -> HubSource | None:
    """The Hub dataset ``location`` names, or None if it has the shape of a local path."""
    if location.startswith((".", "/", "~")) or "\\" in location:
        return None
    match = _HUB_ID.match(location)
    if match is None or _DATA_FILE.search(match["repo"]):
        return None
    if Path(match["repo"].split("/")[0]).is_dir():  # a local folder, not an owner
        return None
    return HubSource(match["repo"], match["file"], match["split"] or DEFAULT_HUB_SPLIT)


def _read(location: str) -> tuple[Iterable[Any], str]:
    """The raw records at ``location`` and the name error messages use for it."""
    path = Path(location)
    if path.is_file():
        return read_json_records(path), path.name
    hub = parse_hub_id(location)
    if hub is None:
        raise FileNotFoundError(f"No data file at {location!r} (and it is not a Hub dataset id owner/name).")
    try:
        return load_hub_rows(hub), str(hub)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{location!r} is neither a local file nor a dataset on the Hugging Face Hub ({err})."
        ) from err


def load_hub_rows(hub: HubSource):
    """The rows of a Hub dataset (``datasets`` is imported only here)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"Loading {hub} from the Hugging Face Hub needs the datasets package: pip install datasets"
        ) from err
    return datasets.load_dataset(hub.repo, data_files=hub.data_file, split=hub.split)


def detect_format(items: Iterable[Any], source: str) -> str:
    """The format of a file, told from the fields of its first record."""
    first = next(iter(items), None)
    if not isinstance(first, dict):
        raise ValueError(
            f"{source}: cannot tell the data format, the first record is {type(first).__name__}; "
            f"write the spec as FORMAT:PATH with one of: {', '.join(_PARSERS)}."
        )
    fields = {key for key, value in first.items() if value is not None}
    detected = _format_of_fields(fields, first)
    if detected is None:
        raise ValueError(
            f"{source}: cannot tell the data format from the fields {sorted(fields)}; write the spec as "
            f"FORMAT:PATH with one of: {', '.join(_PARSERS)}."
        )
    return detected


def _format_of_fields(fields: set[str], first: dict) -> str | None:
    if "requested_rewrite" in fields:
        return "mquake" if isinstance(first["requested_rewrite"], list) else "counterfact"
    rules = [
        ({"src", "alt", "loc"}, "zsre"),
        ({"ent", "pos", "neg"}, "knowedit-convsent"),
        ({"text", "labels", "concept"}, "knowedit-wikibio"),
        ({"prompt", "target_new", "ood_rephrase"}, "temporal"),
        ({"prompt", "target_new", "locality_prompt", "rephrase_prompt", "ground_truth"}, "counterfact"),
        ({"prompt", "target_new", "locality_prompt"}, "hallucination"),
        ({"prompt", "target_new", "locality", "rephrase_prompt"}, "knowedit-zsre"),
        ({"prompt", "target_new", "locality", "ground_truth"}, "knowedit-wiki-counterfact"),
        ({"prompt", "target_new", "locality"}, "knowedit-wiki-recent"),
    ]
    return next((name for needed, name in rules if needed <= fields), None)
