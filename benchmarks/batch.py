"""MEMIT and AlphaEdit on SmolLM2-135M-Instruct: batch sizes, sequential batches, covariance statistics.

    python benchmarks/batch.py                                   # batch 10, 50, 100; sequential 10 x 10
    python benchmarks/batch.py --batch-sizes 1000 --sequential 10x100
    python benchmarks/batch.py --stats-only                      # one pass over the corpus vs one per layer
    python benchmarks/batch.py --batch-sizes 1000 --sequential \
        --variant alphaedit:regularization=0.5 --variant memit:mom2_update_weight=100   # config variants

CounterFact cases (ROME's schema, ``counterfact_rome_sample500.json``; larger batches take the
EasyEdit file's records after them). For each run: probability scores (efficacy / paraphrase /
neighborhood), teacher-forced token accuracy, greedy generation, seconds per edit and peak RSS,
through :func:`peft_edit.evaluation.evaluate` (batch protocol; sequential with ``edit_batch_size``).
Covariance statistics come from WikiText (20k tokens) and are timed separately: all five edited
layers in one pass against one pass per layer. Writes ``benchmarks/results/batch.json`` and a
PNG of scores against the number of edits. Each row records the config fields it overrode, and
rows with different overrides are kept side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import DATA, RESULTS, add_device_argument, device_description

import peft_edit  # noqa: F401  (registers the methods)
from peft_edit.cli import load_model, parse_overrides
from peft_edit.data import load_cases
from peft_edit.evaluation import ScoreSettings, evaluate, pre_edit_reference
from peft_edit.registration import edit_method_config
from peft_edit.stats import key_second_moments

WIKITEXT = str(DATA / "wikitext_wiki.valid.raw")
KEYS = [
    "efficacy_prob",
    "paraphrase_prob",
    "neighborhood_prob",
    "reliability_tf",
    "generalization_tf",
    "locality_tf",
    "reliability_gen",
    "generalization_gen",
    "locality_gen",
    "seconds_per_edit",
    "peak_rss_mb",
    "peak_gpu_mb",
]


def cases_for(n: int):
    """The first ``n`` CounterFact cases: ROME's sample first, then the EasyEdit file's records."""
    cases = load_cases(f"counterfact:{DATA / 'counterfact_rome_sample500.json'}", limit=n)
    if len(cases) < n:
        seen = {c.request.fact for c in cases}
        more = load_cases(f"counterfact:{DATA / 'counterfact_easyedit_edit_first2000.json'}")
        cases += [c for c in more if c.request.fact not in seen][: n - len(cases)]
    return cases


def smollm2_for_alphaedit(device):
    """SmolLM2, its tokenizer and AlphaEdit's default config with WikiText statistics, layers chosen."""
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2", device=device)
    config = edit_method_config("alphaedit", stats_corpus=WIKITEXT)
    config.choose_target_modules(model)
    return model, tokenizer, config


def time_statistics(model, tokenizer, layers: list[int], samples: int) -> dict:
    """Seconds for all ``layers`` in one pass against one pass per layer (no cache either way)."""
    started = time.perf_counter()
    key_second_moments(
        model, tokenizer, layers, WIKITEXT, sample_count=samples, use_cache=False, progress=False
    )
    one_pass = time.perf_counter() - started
    started = time.perf_counter()
    for layer in layers:
        key_second_moments(
            model, tokenizer, [layer], WIKITEXT, sample_count=samples, use_cache=False, progress=False
        )
    per_layer = time.perf_counter() - started
    return {
        "layers": layers,
        "tokens": samples,
        "one_pass_seconds": round(one_pass, 1),
        "one_pass_per_layer_seconds": round(per_layer, 1),
        "speedup": round(per_layer / one_pass, 2),
    }


def run(model, tokenizer, method, cases, protocol, edit_batch_size, reference, overrides: dict, args):
    config = edit_method_config(method, **{"stats_corpus": WIKITEXT, **overrides})
    kwargs = (
        {
            "edit_batch_size": edit_batch_size,
            "eval_every": args.eval_every or edit_batch_size,
            # A long sequential run shows each point as it is scored.
            "on_curve_point": lambda point: print(json.dumps({"method": method, **point}), flush=True),
        }
        if protocol == "sequential"
        else {}
    )
    result = evaluate(
        model,
        tokenizer,
        cases,
        config,
        protocol,
        generation_tokens=0,
        batch_size=args.score_batch_size,
        reference=reference,
        **kwargs,
    )
    row = {
        "method": method,
        "protocol": protocol,
        "edits": len(cases),
        "edit_batch_size": edit_batch_size or len(cases),
        "overrides": overrides,
        # What the run used, whether set or the device's default (the default has changed before).
        "v_batch_size": config.value_batch_size(model.device),
        **{k: result.summary.get(k) for k in KEYS},
        "unedited": {k: result.baseline.get(k) for k in KEYS if k in result.baseline},
    }
    if result.curve:
        row["curve"] = result.curve
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, key in zip(axes, ["efficacy_prob", "paraphrase_prob", "neighborhood_prob"]):
        for method in sorted({r["method"] for r in rows}):
            batch = sorted(
                (r["edits"], r[key]) for r in rows if r["method"] == method and r["protocol"] == "batch"
            )
            if batch:
                ax.plot(*zip(*batch), marker="o", label=f"{method} (one batch)")
            for r in rows:
                if r["method"] == method and r["protocol"] == "sequential":
                    points = [(p["edits"], p.get(key)) for p in r["curve"] if p.get(key) is not None]
                    ax.plot(*zip(*points), marker=".", linestyle="--",
                            label=f"{method} (sequential, batches of {r['edit_batch_size']})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("number of edits")
        ax.set_title(key)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["memit", "alphaedit"])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[10, 50, 100])
    parser.add_argument("--sequential", nargs="*", default=["10x10"], help="BATCHESxSIZE runs (AlphaEdit)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="sequential runs: score every this many edits (default: each batch)",
    )
    parser.add_argument(
        "--score-batch-size",
        type=int,
        default=32,
        help="prompts per forward pass when scoring (larger on a GPU)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="METHOD:FIELD=VALUE[,FIELD=VALUE]",
        help="instead of --methods: one method with these fields set (on top of --set), run at every batch size; "
        "repeat for several variants",
    )
    parser.add_argument("--stats-only", action="store_true")
    parser.add_argument("--no-stats", action="store_true", help="skip timing the covariance statistics")
    parser.add_argument(
        "--set", action="append", default=[], metavar="[METHOD.]FIELD=VALUE", help="config override"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "batch.json")
    add_device_argument(parser)
    args = parser.parse_args()
    # The sequential runs are AlphaEdit's.
    methods = sorted({*args.methods, "alphaedit", *(v.partition(":")[0] for v in args.variant)})
    overrides = parse_overrides(args.set, methods)
    variants = [parse_variant(v) for v in args.variant] or [(m, {}) for m in args.methods]

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2", device=args.device)
    memit = edit_method_config("memit")
    memit.choose_target_modules(model)  # the default layers for this model
    layers = list(memit.layers)
    output = json.loads(args.output.read_text()) if args.output.is_file() else {"runs": []}
    output["device"] = device_description(model.device)
    output["rss_after_loading_mb"] = resident_mb()  # what the peaks below are to be read against
    if not args.no_stats:
        output["statistics"] = time_statistics(model, tokenizer, layers, 20_000)
        print(json.dumps(output["statistics"]))
    save(output, args.output)
    if args.stats_only:
        return
    plan = [
        (method, "batch", n, None, {**overrides[method], **changed})
        for method, changed in variants
        for n in args.batch_sizes
    ]
    for spec in args.sequential:
        batches, size = (int(x) for x in spec.split("x"))
        plan.append(("alphaedit", "sequential", batches * size, size, overrides["alphaedit"]))
    cases = cases_for(max(n for _, _, n, *_ in plan))
    started = time.perf_counter()
    reference = pre_edit_reference(
        model, tokenizer, cases, ScoreSettings(batch_size=args.score_batch_size, generation_tokens=0), []
    )
    print(f"unedited model scored on {len(cases)} cases in {time.perf_counter() - started:.1f} s")
    for method, protocol, n, size, fields in plan:
        row = run(model, tokenizer, method, cases[:n], protocol, size, reference.subset(n), fields, args)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        # Saved after every run: a long sweep that is stopped keeps what it finished.
        output["runs"] = [r for r in output["runs"] if _run_key(r) != _run_key(row)] + [row]
        save(output, args.output)
        plot(output["runs"], args.output.with_suffix(".png"))


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"METHOD:FIELD=VALUE,FIELD=VALUE"`` (or ``"METHOD"``) as ``(method, {field: value})``."""
    method, _, fields = spec.partition(":")
    items = [item for item in fields.split(",") if item]
    return method, parse_overrides(items, [method])[method]


def resident_mb() -> float:
    """The process's resident memory now (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run_key(row: dict) -> tuple:
    """Rows with the same key replace each other; a run with another default batch is kept beside."""
    overrides = json.dumps(row.get("overrides", {}), sort_keys=True)
    return row["method"], row["protocol"], row["edits"], row["edit_batch_size"], overrides, row.get("v_batch_size")


def save(output: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
