"""Lifelong editing on SmolLM2: thousands of corrections, one at a time, into one adapter.

    python benchmarks/lifelong.py                              # GRACE, 300 zsRE + 300 hallucination cases
    python benchmarks/lifelong.py --methods grace wise tpatcher
    python benchmarks/lifelong.py --full                       # 1,000 zsRE cases (hallucination has 600)
    python benchmarks/lifelong.py --limit 50 --eval-every 25   # a quick run
    python benchmarks/lifelong.py --set grace.init_radius=0.4  # a config override (FIELD=VALUE for all)
    python benchmarks/lifelong.py --replot                     # tables and charts of all runs so far
    python benchmarks/lifelong.py --methods wise --resume      # go on from where a stopped run got

Any registered edit method can be named (``peft_edit.register_edit_method``). Cases are edited
sequentially into the same adapter; after every ``--eval-every`` edits every case edited so far
is scored: reliability (edit prompts), generalization (rephrases; the hallucination set has
none) and locality (unrelated prompts keep their outputs), each teacher-forced (``_tf``: share
of answer tokens that are the argmax) and by greedy generation (``_gen``: output starts with
the target; locality: output unchanged). Also reported: seconds per edit, the adapter's size on
disk after the last edit, and the process's peak memory.

Writes ``benchmarks/results/lifelong_<data>_<method>.json`` (each as its run ends; meanwhile
``partial_lifelong_<data>_<method>.json`` holds every curve point scored so far, so an
interrupted run of hours keeps what it measured, and ``checkpoints/lifelong_<data>_<method>/`` the
adapter and progress as of that point: ``--resume`` loads them and edits only the cases after it) and
``benchmarks/results/lifelong/<data>/`` (``sequential.png``: every metric over the number of
edits, for the methods of this invocation; ``metrics.png``), and prints a table per data set.
Timings depend on the machine's load: the JSON records the load average and the number of
threads used.

Methods that train a memory to stay silent on unrelated text (WISE, T-Patcher: the
``unrelated_texts`` field) get the locality prompts of ``--unrelated`` held-out records from the
end of the same file, never the evaluated ones, as WISE's and T-Patcher's papers draw their
irrelevant inputs from the training split; ``--unrelated 0`` keeps the built-in everyday texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from common import DATA, RESULTS, add_device_argument, device_description

import peft_edit  # noqa: F401  (registers the methods)
from peft_edit.cli import load_model, parse_overrides
from peft_edit.data import load_cases
from peft_edit.evaluation import ScoreSettings, evaluate, pre_edit_reference
from peft_edit.evaluation.report import format_table, plot_results, read_json, write_json
from peft_edit.registration import EDIT_METHODS
from peft_edit.requests import join_prompt_and_target

SETS = {
    # MEND's zsRE: src question -> alt answer, a rephrased question, an unrelated NQ question.
    "zsre": f"zsre:{DATA / 'zsre_mend_eval_portability_gpt4.json'}",
    # WISE's hallucination set: a Wikipedia passage -> a corrected sentence, unrelated web text.
    "hallucination": f"hallucination:{DATA / 'wise_hallucination_edit.json'}",
}
CURVE_COLUMNS = ["reliability_tf", "generalization_tf", "locality_tf", "reliability_gen", "generalization_gen",
                 "locality_gen"]  # fmt: skip


def held_out_unrelated_texts(cases, evaluated: int, count: int, with_edits: bool = False) -> list[str]:
    """The locality prompts of the last ``count`` cases, none of them among the first ``evaluated``;
    ``with_edits``: their edits too, each prompt followed by its new target (other corrections of the
    same kind, which a memory holding one edit must leave alone as well)."""
    count = min(count, len(cases) - evaluated)
    if count < 1:
        return []
    held_out = cases[-count:]
    texts = [probe.prompt for case in held_out for probe in case.neighbors]
    if with_edits:
        texts += [join_prompt_and_target(r.filled_prompt, r.target_new) for case in held_out for r in case.requests]
    return texts


def with_unrelated_texts(method: str, overrides: dict, texts: list[str]) -> dict:
    """``overrides`` plus ``unrelated_texts`` for methods that have the field (unless set already)."""
    fields = {f.name for f in dataclasses.fields(EDIT_METHODS[method])}
    if not texts or "unrelated_texts" not in fields or "unrelated_texts" in overrides:
        return overrides
    return {**overrides, "unrelated_texts": texts}


def print_curve(result) -> None:
    print(f"\n{result.method}: after every {result.curve[0]['edits']} edits")
    print("| edits | " + " | ".join(CURVE_COLUMNS) + " |")
    print("|---" * (len(CURVE_COLUMNS) + 1) + "|")
    for point in result.curve:
        cells = ["–" if point.get(k) is None else f"{point[k]:.3f}" for k in CURVE_COLUMNS]
        print(f"| {point['edits']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["grace"], help="registered edit methods")
    parser.add_argument("--data", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument(
        "--limit", type=int, default=300, help="cases per data set (edited one after another)"
    )
    parser.add_argument(
        "--full", action="store_true", help="1,000 cases per data set (as many as the file has)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=50, help="score every case edited so far every N edits"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="[METHOD.]FIELD=VALUE", help="config override"
    )
    parser.add_argument(
        "--unrelated",
        type=int,
        default=100,
        help="held-out records whose locality prompts WISE/T-Patcher keep silent on (0: built-in texts)",
    )
    parser.add_argument(
        "--unrelated-edits",
        action="store_true",
        help="also the held-out records' edits (prompt and new target): other corrections to leave alone",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on from the checkpoint a stopped run of the same cases and settings left (its edits are "
        "loaded, not made again); without it a run starts afresh",
    )
    parser.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep the last checkpoint (the adapter after the last edit, with its ledger) when the run ends",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="edit nothing: tables and charts from the JSON files of earlier runs (methods side by side)",
    )
    add_device_argument(parser)
    args = parser.parse_args()
    if args.replot:
        return replot(args.data, args.output_dir)

    unknown = [m for m in args.methods if m not in EDIT_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {', '.join(sorted(EDIT_METHODS))}")
    overrides = parse_overrides(args.set, args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = 1000 if args.full else args.limit

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2", device=args.device)
    # Answers and corrections are short (zsRE) or one sentence (hallucination): no free generation.
    settings = ScoreSettings(generation_tokens=0)
    for name in args.data:
        every_case = load_cases(SETS[name])
        cases = every_case[:limit]
        unrelated = held_out_unrelated_texts(every_case, len(cases), args.unrelated, args.unrelated_edits)
        checkpoints = args.output_dir / "checkpoints"
        reference = unedited_reference(
            checkpoints / f"reference_{name}.pt", model, tokenizer, cases, settings, args.resume
        )
        results = []
        for method in args.methods:
            progress = CurveProgress(args.output_dir / f"partial_lifelong_{name}_{method}.json", method, name)
            checkpoint = checkpoints / f"lifelong_{name}_{method}"
            result = evaluate(
                model,
                tokenizer,
                cases,
                method,
                "sequential",
                config_overrides=with_unrelated_texts(method, overrides[method], unrelated),
                eval_every=args.eval_every,
                generation_tokens=0,
                reference=reference,
                on_curve_point=progress.add,
                checkpoint=checkpoint,
                resume=args.resume,
            )
            results.append(result)
            meta = {
                "model": "SmolLM2-135M-Instruct",
                "data": SETS[name],
                "cases": len(cases),
                "held_out_unrelated_texts": len(unrelated),
                "held_out_edits_among_them": args.unrelated_edits,
                "device": device_description(model.device),
                "load_average_at_end": os.getloadavg(),
                "cpu_count": os.cpu_count(),
            }
            # One file per method and data set, written as soon as the run ends.
            path = write_json(args.output_dir / f"lifelong_{name}_{method}.json", [result], meta)
            progress.remove()
            if not args.keep_checkpoint:
                shutil.rmtree(checkpoint, ignore_errors=True)  # the run is complete: nothing to resume
            print(f"wrote {path}")
        (checkpoints / f"reference_{name}.pt").unlink(missing_ok=True)
        report(name, results, args.output_dir)


def unedited_reference(path: Path, model, tokenizer, cases, settings, resume: bool):
    """The unedited model's outputs on ``cases``: read from ``path`` when resuming a run on the same cases
    (on 1,000 zsRE cases they take a quarter of an hour on one thread), else computed and kept there."""
    if resume and path.is_file():
        saved = torch.load(path, weights_only=False)  # written by this script on this machine
        if saved.case_ids == [c.case_id for c in cases]:
            return saved
    reference = pre_edit_reference(model, tokenizer, cases, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    unfinished = path.with_name(path.name + ".tmp")
    torch.save(reference, unfinished)
    unfinished.replace(path)
    return reference


class CurveProgress:
    """The curve points of a run in progress, rewritten to ``path`` after each one (whole or not at all)."""

    def __init__(self, path: Path, method: str, data: str) -> None:
        self.path, self.method, self.data, self.points = path, method, data, []

    def add(self, point: dict) -> None:
        self.points.append(point)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        unfinished = self.path.with_name(self.path.name + ".tmp")
        unfinished.write_text(
            json.dumps({"method": self.method, "data": self.data, "curve": self.points}, indent=1)
        )
        unfinished.replace(self.path)  # a rename: an interruption leaves the previous file intact

    def remove(self) -> None:
        """The run's own file is written: the progress file has served."""
        self.path.unlink(missing_ok=True)


def report(name: str, results, output_dir: Path) -> None:
    """Print the table and curves of ``results`` on data set ``name`` and draw their charts."""
    charts = plot_results(results, output_dir / "lifelong" / name)
    print(f"\n### {name}\n")
    print(format_table(results))
    for r in results:
        print_curve(r)
        s = r.summary
        print(
            f"{r.method}: {s['cases']} cases, {s['seconds_per_edit']:.2f} s per edit, "
            f"adapter {s['adapter_kb']:.0f} KB on disk, peak RSS {s['peak_rss_mb']:.0f} MB"
        )
    print(f"wrote {', '.join(str(c) for c in charts)}")


def replot(data: list[str], output_dir: Path) -> None:
    """Tables and charts from the JSON files already written, every method side by side."""
    for name in data:
        files = sorted(output_dir.glob(f"lifelong_{name}_*.json"))
        if files:
            report(name, [run for f in files for run in read_json(f)], output_dir)


if __name__ == "__main__":
    main()
