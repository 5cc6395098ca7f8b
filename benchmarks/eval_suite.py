"""Every metric family for the registered edit methods on SmolLM2, CounterFact and zsRE.

    python benchmarks/eval_suite.py                                  # ROME, 100 + 100 cases, single protocol
    python benchmarks/eval_suite.py --methods all --protocols single sequential
    python benchmarks/eval_suite.py --limit 3                        # a quick check that it runs
    python benchmarks/eval_suite.py --limit 500 --reference-only     # how long scoring takes

For each data set the unedited model's probe outputs are computed once (all cases in one batched
pass; its time is reported as ``reference_seconds``) and shared by every method and protocol.
Writes ``benchmarks/results/eval_<data>_<protocol>.json`` (one run per method) and prints one
markdown table per data set and protocol, followed by how the time was spent: editing, scoring
the edited model, and scoring the unedited one. Methods can be run separately: a run replaces
the file's run of the same method and keeps those of other methods on the same number of cases,
including runs written by another invocation while this one was running.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import DATA, RESULTS, add_device_argument, device_description

import peft_edit  # noqa: F401  (registers the methods)
from peft_edit.cli import load_model, parse_overrides
from peft_edit.data import load_cases, load_piqa
from peft_edit.evaluation import PROTOCOLS, ScoreSettings, evaluate, pre_edit_reference
from peft_edit.evaluation.piqa import sample_questions
from peft_edit.evaluation.report import format_table, read_json, write_json
from peft_edit.registration import EDIT_METHODS

SETS = {
    # ROME's schema: rephrases, ten neighbours, generation prompts (fluency, consistency).
    "counterfact": f"counterfact:{DATA / 'counterfact_rome_sample500.json'}",
    # MEND's zsRE with EasyEdit's one-hop portability questions.
    "zsre": f"zsre:{DATA / 'zsre_mend_eval_portability_gpt4.json'}",
}
PIQA = DATA / "piqa_valid_with_labels.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["rome"], help="registered methods, or 'all'")
    parser.add_argument("--data", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--protocols", nargs="+", default=["single"], choices=PROTOCOLS)
    parser.add_argument("--limit", type=int, default=100, help="cases per data set")
    parser.add_argument(
        "--piqa-sample", type=int, default=100, help="PIQA questions (0: skip the downstream check)"
    )
    parser.add_argument("--generation-tokens", type=int, default=64, help="greedy tokens for fluency")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="sequential protocol: score every N cases"
    )
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--reference-only", action="store_true", help="only time scoring the unedited model on every probe"
    )
    add_device_argument(parser)
    args = parser.parse_args()

    methods = sorted(EDIT_METHODS) if args.methods == ["all"] else args.methods
    unknown = [m for m in methods if m not in EDIT_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {', '.join(sorted(EDIT_METHODS))}")
    overrides = parse_overrides(args.set, methods)

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2", device=args.device)
    settings = ScoreSettings(generation_tokens=args.generation_tokens)
    questions = sample_questions(load_piqa(PIQA), args.piqa_sample) if args.piqa_sample else []
    for name in args.data:
        cases = load_cases(SETS[name], limit=args.limit)
        reference = pre_edit_reference(model, tokenizer, cases, settings, questions)
        if args.reference_only:
            print(f"{name}: all probes of {len(cases)} cases scored in {reference.seconds:.1f} s")
            continue
        for protocol in args.protocols:
            meta = {
                "model": "SmolLM2-135M-Instruct",
                "data": SETS[name],
                "device": device_description(model.device),
            }
            path = args.output_dir / f"eval_{name}_{protocol}.json"
            results = []
            for method in methods:
                results.append(
                    evaluate(
                        model,
                        tokenizer,
                        cases,
                        method,
                        protocol,
                        config_overrides=overrides[method],
                        eval_every=args.eval_every,
                        piqa=questions,
                        generation_tokens=args.generation_tokens,
                        reference=reference,
                    )
                )
                # The file is read again before each write, so that runs of other methods written
                # meanwhile (by another invocation on other methods) are kept.
                kept = earlier_runs(path, exclude=[r.method for r in results], cases=len(cases))
                runs = sorted(kept + results, key=lambda r: r.method)
                write_json(path, runs, meta)  # after every method: a stopped run keeps what it finished
            print(f"\n### {name}, {len(cases)} cases, {protocol} protocol\n")
            print(format_table(runs))
            print(
                f"\nunedited model, all probes of all {len(cases)} cases batched: {reference.seconds:.1f} s"
            )
            for r in runs:
                s = r.summary
                print(
                    f"{r.method}: editing {s['edit_seconds']:.1f} s ({s['seconds_per_edit']:.2f} s per edit), "
                    f"scoring the edited model {s['eval_seconds']:.1f} s"
                )
            print(f"wrote {path}")


def earlier_runs(path: Path, exclude: list[str], cases: int) -> list:
    """The runs already in ``path`` of methods other than ``exclude``, scored on ``cases`` cases."""
    if not path.exists():
        return []
    kept = []
    for run in read_json(path):
        if run.method in exclude:
            continue
        if run.summary.get("cases") == cases:
            kept.append(run)
        else:
            print(f"dropping {run.method}'s run from {path}: {run.summary.get('cases')} cases, not {cases}")
    return kept


if __name__ == "__main__":
    main()
