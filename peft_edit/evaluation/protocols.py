"""The evaluation protocols: how edits are applied before they are scored.

* ``single``: each case alone — edit, score, unload — with the restore checked bit for bit;
* ``batch``: every case's requests in one ``get_edited_model`` call, then all cases scored;
* ``sequential``: cases edited one after another into the same adapter (``edited.edit``),
  scored every ``eval_every`` cases on the cases edited so far and after the last (the curve
  shows how earlier edits hold up as more arrive).

The unedited model's outputs on every probe are computed once (:func:`pre_edit_reference`) and
serve both as the baseline scores and as the reference for locality; pass the same
``reference`` to several :func:`evaluate` calls to compute it only once.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import PiqaExample, load_piqa
from ..data.cases import EditCase
from ..edited_model import get_edited_model, load_edited_model
from ..registration import edit_method_config
from ..tuners.config import EditConfig
from .checkpoint import Progress, adapter_folder, load_progress, run_settings, save_checkpoint
from .piqa import piqa_accuracy, sample_questions
from .restore import WeightSnapshot
from .scoring import METRICS, CaseOutputs, ScoreSettings, case_metrics, run_probes, summarize

PROTOCOLS = ("single", "batch", "sequential")

# Config fields that are not hyperparameters: the adapter's state and peft's bookkeeping.
STATE_FIELDS = {
    "edits", "base_fingerprints", "revision", "inference_mode", "peft_type", "peft_version", "auto_mapping",
    "task_type",
}  # fmt: skip


@dataclass
class Reference:
    """The unedited model on the cases: its probe outputs, its own scores, its PIQA accuracy."""

    case_ids: list[str]
    outputs: list[CaseOutputs]
    records: list[dict]
    summary: dict[str, float | None]
    seconds: float

    def subset(self, n: int) -> Reference:
        """The reference for the first ``n`` cases (its summary recomputed over them)."""
        records = self.records[:n]
        summary = {**summarize(records), "piqa_acc": self.summary.get("piqa_acc")}
        return Reference(self.case_ids[:n], self.outputs[:n], records, summary, self.seconds)


@dataclass
class EvaluationResult:
    """One method under one protocol on one set of cases.

    ``summary`` maps each metric (see ``scoring.METRICS``), ``piqa_acc`` and the efficiency
    numbers to a number (``None`` where the data cannot give it); ``baseline`` holds the unedited
    model's scores on the same probes; ``records`` the per-case results; ``curve`` (sequential
    only) the summary after every ``eval_every`` cases.
    """

    method: str
    protocol: str
    config: dict[str, Any]
    summary: dict[str, float | None]
    baseline: dict[str, float | None]
    records: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cases_from_spec(spec: str, limit: int | None = None) -> list[EditCase]:
    """Cases from a ``FORMAT:PATH`` spec such as ``counterfact:data/counterfact.json`` (see ``peft_edit.data``)."""
    from ..data import load_cases

    return load_cases(spec, limit=limit)


def resolve_config(method: str | EditConfig, overrides: dict[str, Any] | None = None) -> EditConfig:
    """A method's config from its registered name (or a config object), with ``overrides`` applied."""
    overrides = overrides or {}
    if isinstance(method, EditConfig):
        return dataclasses.replace(copy.deepcopy(method), **overrides) if overrides else method
    return edit_method_config(method, **overrides)


def describe_config(config: EditConfig) -> dict[str, Any]:
    """The config's hyperparameters (as resolved on the model: layer, target modules), JSON-friendly."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name in STATE_FIELDS or f.name.startswith("_"):
            continue
        value = getattr(config, f.name)
        out[f.name] = (
            value if isinstance(value, (int, float, str, bool, list, dict, type(None))) else str(value)
        )
    return out


def pre_edit_reference(
    model,
    tokenizer,
    cases: Sequence[EditCase],
    settings: ScoreSettings | None = None,
    piqa_questions: Sequence[PiqaExample] = (),
    progress: bool = True,
) -> Reference:
    """Run every probe once on the unedited model; its outputs are the locality reference and baseline."""
    started = time.perf_counter()
    outputs = run_probes(model, tokenizer, cases, settings, progress=progress, desc="unedited model")
    records = [case_metrics(c, o, o) for c, o in zip(cases, outputs)]
    summary = summarize(records)
    summary["piqa_acc"] = piqa_accuracy(
        model, tokenizer, list(piqa_questions), (settings or ScoreSettings()).batch_size
    )
    return Reference([c.case_id for c in cases], outputs, records, summary, time.perf_counter() - started)


class _Meter:
    """Seconds spent editing and scoring, and peak memory, over one evaluation."""

    def __init__(self, model) -> None:
        self.resolved_config: EditConfig | None = None  # the config as the first edit resolved it
        self.edit_seconds: list[float] = []
        self.eval_seconds = 0.0
        self.requests = 0
        self.adapter_bytes: int | None = None  # on disk, as saved after the last edit (batch, sequential)
        self.cuda = next(model.parameters()).is_cuda
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    @contextmanager
    def editing(self, requests: int):
        """Time one edit call of ``requests`` requests (a call that raises is not counted)."""
        started = time.perf_counter()
        yield
        self.edit_seconds.append(time.perf_counter() - started)
        self.requests += requests

    def measure_adapter(self, edited) -> None:
        """The size of what ``save_pretrained`` writes for ``edited`` (every file of the adapter folder)."""
        with tempfile.TemporaryDirectory() as folder:
            edited.save_pretrained(folder)
            self.adapter_bytes = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())

    def remember_config(self, edited) -> None:
        if self.resolved_config is None:
            self.resolved_config = copy.deepcopy(edited.peft_config[edited.active_adapter])

    def summary(self) -> dict[str, float | None]:
        total = sum(self.edit_seconds)
        return {
            "seconds_per_edit": total / self.requests if self.requests else None,
            "first_edit_seconds": self.edit_seconds[0] if self.edit_seconds else None,
            "edit_seconds": total,
            "eval_seconds": self.eval_seconds,
            # ru_maxrss is in KiB on Linux: the process's peak, model loading included.
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None,
            "adapter_kb": self.adapter_bytes / 1024 if self.adapter_bytes is not None else None,
        }


def evaluate(
    model,
    tokenizer,
    cases: Sequence[EditCase] | str,
    method: str | EditConfig = "rome",
    protocol: str = "single",
    *,
    config_overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    eval_every: int | None = None,
    edit_batch_size: int = 1,
    piqa: str | os.PathLike | Sequence[PiqaExample] | None = None,
    piqa_sample: int = 100,
    piqa_every: int | None = None,
    batch_size: int = 32,
    generation_tokens: int = 64,
    reference: Reference | None = None,
    verify_restore: bool = True,
    progress: bool = True,
    on_curve_point: Callable[[dict], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
) -> EvaluationResult:
    """Edit ``model`` with ``method`` under ``protocol`` and score every case; the model is restored after.

    Args:
        cases: ``EditCase`` objects or a data spec (``"counterfact:PATH"``), cut to ``limit``.
        method: a registered method name (``"rome"``, ...) or a config object;
            ``config_overrides`` sets its fields (``{"layer": 5}``).
        eval_every: sequential protocol: score after every this many cases (default: ten points).
        edit_batch_size: sequential protocol: cases per ``edit`` call (MEMIT/AlphaEdit's
            sequential batch editing); the curve is scored at the first call boundary at or after
            every ``eval_every`` cases.
        piqa: a PIQA file (or examples from ``peft_edit.data.load_piqa``) for the downstream
            check; ``piqa_sample`` questions are drawn from a file (seeded). Without it ``piqa_acc`` is ``None``.
        piqa_every: single protocol: PIQA is asked after every this many edits (default: ten
            times in all), as it costs more than the rest of a case's scoring.
        generation_tokens: greedy tokens per generation prompt for fluency and consistency (0 skips them).
        reference: the unedited model's outputs from :func:`pre_edit_reference` on the same cases,
            to share between calls; computed here if not given.
        verify_restore: hash every weight before and check it bit for bit after the edits are unloaded.
        on_curve_point: sequential protocol: called with each curve point as soon as it is scored,
            so that a run of hours can keep its progress (the benchmarks write it to a file). A
            resumed run hands it the points it restored first.
        checkpoint: sequential protocol: a folder where the adapter and the run's progress are
            written at every curve point (:mod:`~peft_edit.evaluation.checkpoint`), replacing what
            it held.
        resume: go on from the progress in ``checkpoint``, if it holds any: its adapter is loaded
            onto ``model`` instead of the cases it covers being edited again. Refused if it was
            written for other cases or settings. Seconds per edit then count every edit, those of
            the earlier run included; peak memory is this process's.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    if edit_batch_size != 1 and protocol != "sequential":
        raise ValueError(
            "edit_batch_size applies to the sequential protocol (batch edits everything at once)."
        )
    if on_curve_point is not None and protocol != "sequential":
        raise ValueError("on_curve_point applies to the sequential protocol, the only one with a curve.")
    if checkpoint is not None and protocol != "sequential":
        raise ValueError("checkpoint applies to the sequential protocol (the others edit and score once).")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint folder to go on from.")
    for name, value in (
        ("eval_every", eval_every),
        ("piqa_every", piqa_every),
        ("edit_batch_size", edit_batch_size),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if isinstance(cases, str):
        cases = cases_from_spec(cases, limit)
    cases = list(cases[:limit] if limit else cases)
    if not cases:
        raise ValueError("No cases to evaluate.")
    config = resolve_config(method, config_overrides)
    settings = ScoreSettings(batch_size=batch_size, generation_tokens=generation_tokens)
    questions = (
        sample_questions(load_piqa(piqa), piqa_sample)
        if isinstance(piqa, (str, os.PathLike))
        else list(piqa or [])
    )

    if reference is None:
        reference = pre_edit_reference(model, tokenizer, cases, settings, questions, progress)
    elif reference.case_ids != [c.case_id for c in cases]:
        raise ValueError(
            "The reference was computed on other cases; compute it on these (pre_edit_reference)."
        )
    snapshot = WeightSnapshot(model) if verify_restore else None
    meter = _Meter(model)
    run = {"single": _single, "batch": _batch, "sequential": _sequential}[protocol]
    records, curve = run(model, tokenizer, cases, config, settings, reference, questions, meter, snapshot,
                         eval_every=eval_every, edit_batch_size=edit_batch_size, piqa_every=piqa_every,
                         progress=progress, on_curve_point=on_curve_point, checkpoint=checkpoint,
                         resume=resume)  # fmt: skip
    if snapshot is not None:
        snapshot.verify(model)

    summary = summarize(records, [*METRICS, "piqa_acc"])
    if protocol != "single":  # one edited model: its PIQA score is the last curve point's / the batch's
        summary["piqa_acc"] = curve[-1]["piqa_acc"] if curve else records[0].get("piqa_acc")
    summary.update(
        meter.summary(), cases=len(cases), edits=meter.requests, reference_seconds=reference.seconds
    )
    baseline = dict(reference.summary)
    return EvaluationResult(
        config.method,
        protocol,
        describe_config(meter.resolved_config or config),
        summary,
        baseline,
        records,
        curve,
    )


# ----------------------------------------------------------------------------- protocols


def _score(model, tokenizer, cases, indices, settings, reference, meter, progress=False):
    started = time.perf_counter()
    chosen = [cases[i] for i in indices]
    outputs = run_probes(model, tokenizer, chosen, settings, progress=progress, desc="scoring edited model")
    records = [
        {"case_id": c.case_id, **case_metrics(c, o, reference.outputs[i])}
        for i, c, o in zip(indices, chosen, outputs)
    ]
    meter.eval_seconds += time.perf_counter() - started
    return records


def _piqa(model, tokenizer, questions, settings, meter):
    started = time.perf_counter()
    acc = piqa_accuracy(model, tokenizer, list(questions), settings.batch_size)
    meter.eval_seconds += time.perf_counter() - started
    return acc


def _running(records, keys=("reliability_tf", "generalization_tf", "locality_tf")):
    s = summarize(records, keys)
    return {k.replace("_tf", ""): f"{v:.2f}" for k, v in s.items() if v is not None}


def _single(
    model,
    tokenizer,
    cases,
    config,
    settings,
    reference,
    questions,
    meter,
    snapshot,
    *,
    progress,
    piqa_every,
    **_,
):
    piqa_every = piqa_every or max(1, math.ceil(len(cases) / 10))
    records = []
    bar = tqdm(range(len(cases)), desc=f"{config.method} single", disable=not progress)
    for i in bar:
        case = cases[i]
        with meter.editing(len(case.requests)):
            edited = get_edited_model(
                model, config, requests=case.requests, tokenizer=tokenizer, progress=False
            )
        try:
            (record,) = _score(edited, tokenizer, cases, [i], settings, reference, meter)
            # PIQA costs more than an edit's other probes: it is asked after every piqa_every-th edit.
            record["piqa_acc"] = (
                _piqa(edited, tokenizer, questions, settings, meter) if i % piqa_every == 0 else None
            )
            record["edit_seconds"] = meter.edit_seconds[-1]
            targets = list(edited.peft_config[edited.active_adapter].target_modules or [])
            meter.remember_config(edited)
        finally:
            model = edited.unload_edits()
        if snapshot is not None:
            snapshot.verify(model, targets)
        records.append(record)
        bar.set_postfix(_running(records))
    return records, []


def _batch(
    model, tokenizer, cases, config, settings, reference, questions, meter, snapshot, *, progress, **_
):
    requests = [r for c in cases for r in c.requests]
    with meter.editing(len(requests)):
        edited = get_edited_model(model, config, requests=requests, tokenizer=tokenizer, progress=progress)
    meter.remember_config(edited)
    try:
        records = _score(edited, tokenizer, cases, range(len(cases)), settings, reference, meter, progress)
        acc = _piqa(edited, tokenizer, questions, settings, meter)
        meter.measure_adapter(edited)
    finally:
        edited.unload_edits()
    for r in records:
        r["piqa_acc"] = acc
    return records, []


def _sequential(
    model, tokenizer, cases, config, settings, reference, questions, meter, snapshot, *, eval_every,
    edit_batch_size, progress, on_curve_point=None, checkpoint=None, resume=False, **_,
):  # fmt: skip
    every = eval_every or max(1, math.ceil(len(cases) / 10))
    run = run_settings(
        method=config.method,
        config=describe_config(config),
        case_ids=[c.case_id for c in cases],
        edit_batch_size=edit_batch_size,
        eval_every=every,
        generation_tokens=settings.generation_tokens,  # which scores there are
        piqa_questions=[q.goal for q in questions],
    )
    restored = load_progress(checkpoint, run) if resume else None
    first = restored.cases_done if restored is not None else 0
    edited = None
    curve: list[dict] = []
    records: list[dict] = []
    bar = tqdm(total=len(cases), initial=first, desc=f"{config.method} sequential", disable=not progress)
    try:
        if restored is not None:  # the edits it covers are loaded, not made again
            edited = load_edited_model(model, adapter_folder(checkpoint), tokenizer=tokenizer)
            meter.edit_seconds, meter.requests = list(restored.edit_seconds), restored.requests
            meter.eval_seconds = restored.eval_seconds
            meter.remember_config(edited)
            curve, records = list(restored.curve), list(restored.records)
            for point in curve if on_curve_point is not None else []:
                on_curve_point(dict(point))
        for start in range(first, len(cases), edit_batch_size):
            done = min(start + edit_batch_size, len(cases))
            reqs = [r for c in cases[start:done] for r in c.requests]
            with meter.editing(len(reqs)):
                if edited is None:
                    edited = get_edited_model(
                        model, config, requests=reqs, tokenizer=tokenizer, progress=False
                    )
                else:
                    edited.edit(reqs, progress=False)
            meter.remember_config(edited)
            bar.update(done - start)
            if done // every == start // every and done < len(cases):
                continue  # no multiple of eval_every was reached by this call
            records = _score(edited, tokenizer, cases, range(done), settings, reference, meter)
            point = {"cases": done, "edits": meter.requests, **summarize(records)}
            point["piqa_acc"] = _piqa(edited, tokenizer, questions, settings, meter)
            curve.append(point)
            if checkpoint is not None:
                so_far = Progress(
                    run, done, meter.requests, meter.edit_seconds, meter.eval_seconds, curve, records
                )
                save_checkpoint(checkpoint, edited, so_far)
            if on_curve_point is not None:
                on_curve_point(dict(point))
            bar.set_postfix(_running(records))
        meter.measure_adapter(edited)
    finally:
        bar.close()
        if edited is not None:
            edited.unload_edits()
    if edit_batch_size == 1:
        for r, seconds in zip(records, meter.edit_seconds):
            r["edit_seconds"] = seconds
    return records, curve
