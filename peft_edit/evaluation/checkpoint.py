"""A sequential evaluation's progress on disk, so that a run of hours can stop and go on later.

At every curve point the sequential protocol writes one folder, whole or not at all
(:func:`~peft_edit.atomic.atomic_directory`): ``adapter/``, the edited adapter as ``save_pretrained``
writes it, and ``progress.json``, how far the run got (cases edited, every edit call's seconds,
the curve, the latest scores). ``evaluate(..., checkpoint=folder, resume=True)`` with the same
cases and settings loads that adapter onto the model instead of making those edits again, and
goes on from the next case.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory

PROGRESS_FILE = "progress.json"
ADAPTER_FOLDER = "adapter"


@dataclass
class Progress:
    """How far a sequential run got, as of its latest curve point."""

    settings: dict[str, Any]  # what a run must share to go on from here (see run_settings)
    cases_done: int
    requests: int  # edit requests made (a case may hold several)
    edit_seconds: list[float]  # per edit call
    eval_seconds: float
    curve: list[dict]
    records: list[dict]  # the scores of every case edited so far, at the latest point


def run_settings(**settings) -> dict:
    """What a checkpoint records of its run and a resumed run must match (method, config, case ids,
    ...), as JSON reads it back: tuples become lists, as in the file."""
    return json.loads(json.dumps(settings))


def save_checkpoint(folder: str | os.PathLike, edited, progress: Progress) -> None:
    """Write ``edited``'s adapter and ``progress`` to ``folder``, replacing what it held as a whole."""
    with atomic_directory(folder) as staging:
        edited.save_pretrained(staging / ADAPTER_FOLDER)
        (staging / PROGRESS_FILE).write_text(json.dumps(dataclasses.asdict(progress)))


def load_progress(folder: str | os.PathLike, settings: dict) -> Progress | None:
    """The progress saved in ``folder`` (None if it holds none), refused if made with other ``settings``."""
    path = Path(folder) / PROGRESS_FILE
    if not path.is_file():
        return None
    saved = Progress(**json.loads(path.read_text()))
    differing = sorted(
        k for k in settings.keys() | saved.settings.keys() if settings.get(k) != saved.settings.get(k)
    )
    if differing:
        raise ValueError(
            f"The checkpoint in {folder} was written by a run with another {', '.join(differing)}. Resume "
            "with the same cases and settings, or start afresh (resume=False, or another checkpoint folder)."
        )
    return saved


def adapter_folder(folder: str | os.PathLike) -> Path:
    return Path(folder) / ADAPTER_FOLDER
