"""Reports of evaluation results: a side-by-side table, the JSON file, and PNG charts."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .protocols import EvaluationResult
from .scoring import METRICS

# Rows of the table, in order: the metrics, the downstream check, then efficiency.
TABLE_ROWS = [*METRICS, "piqa_acc", "seconds_per_edit", "peak_rss_mb", "adapter_kb", "eval_seconds"]
_NO_BASELINE = {"seconds_per_edit", "peak_rss_mb", "adapter_kb", "eval_seconds"}


def _cell(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def run_label(result: EvaluationResult) -> str:
    return f"{result.method} ({result.protocol})"


def format_table(results: Sequence[EvaluationResult]) -> str:
    """A markdown table: one row per metric, the unedited model first, then each run side by side."""
    if not results:
        raise ValueError("No results to report.")
    header = ["metric", "unedited", *(run_label(r) for r in results)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in TABLE_ROWS:
        baseline = None if key in _NO_BASELINE else results[0].baseline.get(key)
        cells = [_cell(baseline), *(_cell(r.summary.get(key)) for r in results)]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_json(results: Sequence[EvaluationResult], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run: the result itself (``summary``, ``baseline``, ``records``, ...); several: ``{"runs": [...]}``."""
    meta = meta or {}
    if len(results) == 1:
        return {**meta, **results[0].to_dict()}
    return {**meta, "runs": [r.to_dict() for r in results]}


def write_json(path: str | os.PathLike, results: Sequence[EvaluationResult], meta=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results_json(results, meta), indent=1))
    return path


def read_json(path: str | os.PathLike) -> list[EvaluationResult]:
    """The runs of a file written by :func:`write_json` (its meta fields left out)."""
    data = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(EvaluationResult)}
    return [
        EvaluationResult(**{k: v for k, v in run.items() if k in names}) for run in data.get("runs", [data])
    ]


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "Charts need matplotlib: pip install 'peft-edit[plot]' (or pip install matplotlib)."
        ) from err
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: Sequence[EvaluationResult], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``metrics.png`` (bars per metric: the unedited model and each run) and, for sequential
    runs, ``sequential.png`` (each metric over the number of edits). Returns the files written."""
    plt = require_matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    keys = [
        k
        for k in [*METRICS, "piqa_acc"]
        if k != "fluency" and any(r.summary.get(k) is not None for r in results)
    ]
    series = [("unedited", results[0].baseline), *((run_label(r), r.summary) for r in results)]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(keys)), 4.5))
    width = 0.8 / len(series)
    for s, (label, values) in enumerate(series):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [values.get(k) or 0.0 for k in keys], width, label=label)
    ax.set_xticks(range(len(keys)), keys, rotation=40, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (fraction)")
    ax.set_title("Edit metrics (missing metrics are left out; fluency is in the table)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    written.append(out_dir / "metrics.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    sequential = [r for r in results if r.curve]
    if sequential:
        curve_keys = [k for k in keys if any(p.get(k) is not None for r in sequential for p in r.curve)]
        fig, axes = plt.subplots(1, len(sequential), figsize=(6 * len(sequential), 4.5), squeeze=False)
        for ax, r in zip(axes[0], sequential):
            edits = [p["edits"] for p in r.curve]
            for k in curve_keys:
                ax.plot(edits, [p.get(k) for p in r.curve], marker="o", label=k)
            ax.set_xlabel("edits so far")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{r.method}: sequential edits (scored on the cases edited so far)")
            ax.legend(fontsize="x-small")
        fig.tight_layout()
        written.append(out_dir / "sequential.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
