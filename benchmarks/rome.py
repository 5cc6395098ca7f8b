"""ROME on SmolLM2-135M-Instruct, CounterFact, one edit at a time (edit, score, restore).

    python benchmarks/rome.py                       # 50 + 50 records, default covariance
    python benchmarks/rome.py --covariance identity sampled wikitext --limit 20

For each covariance choice and data file, prints and writes to benchmarks/results/rome.json:
probability scores (ROME's efficacy / paraphrase / neighborhood: P(new) > P(true), or P(true) >
P(new) for neighbours), teacher-forced token accuracy (EasyEdit's rewrite / rephrase / locality
as unchanged argmax tokens), greedy generation (starts with the new target; neighbours keep their
exact continuation), seconds per edit, one-time setup seconds (statistics + prefixes) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import DATA, RESULTS

from peft_edit import RomeConfig, get_edited_model
from peft_edit.data import load_counterfact
from peft_edit.demo import load_smollm2
from peft_edit.evaluation import ScoreSettings, evaluate, pre_edit_reference
from peft_edit.tuners.per_model import context_templates, second_moments

FILES = {
    "counterfact-easyedit": DATA / "counterfact_easyedit_edit_first2000.json",
    "counterfact-rome": DATA / "counterfact_rome_sample500.json",
}
COVARIANCE = {"identity": "identity", "sampled": None, "wikitext": str(DATA / "wikitext_wiki.valid.raw")}
# The numbers in the table; fluency is left to benchmarks/eval_suite.py (this file's EasyEdit
# records have no generation prompts).
COLUMNS = [
    "efficacy_prob", "paraphrase_prob", "neighborhood_prob", "reliability_tf", "generalization_tf", "locality_tf",
    "reliability_gen", "generalization_gen", "locality_gen", "seconds_per_edit", "peak_rss_mb",
]  # fmt: skip
SETTINGS = ScoreSettings(generation_tokens=0)


def warm_up(model, tokenizer, config) -> float:
    """Sample the prefixes and compute the covariance statistics once; returns the seconds it took.

    Both are cached per base model, so the edits timed afterwards measure the edit alone.
    """
    started = time.perf_counter()
    warm = get_edited_model(model, config, tokenizer=tokenizer)  # resolves the layer on this model
    resolved = warm.peft_config["default"]
    context_templates(warm.base_model.model, tokenizer, resolved)
    second_moments(warm.base_model.model, tokenizer, resolved, [resolved.layer])
    warm.unload_edits()
    return time.perf_counter() - started


def run(model, tokenizer, cases, covariance: str, overrides: dict, reference):
    """Edit, score and restore each case alone (the harness's single protocol)."""
    config = RomeConfig(stats_corpus=COVARIANCE[covariance], **overrides)
    setup_seconds = warm_up(model, tokenizer, config)
    result = evaluate(
        model,
        tokenizer,
        cases,
        config,
        "single",
        generation_tokens=SETTINGS.generation_tokens,
        reference=reference,
    )
    summary = {k: result.summary[k] for k in COLUMNS}
    summary.update(setup_seconds=setup_seconds, layer=config.layer, cases=len(cases))
    return summary, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=50, help="records per data file")
    parser.add_argument("--data", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--covariance", nargs="+", default=["sampled"], choices=list(COVARIANCE))
    parser.add_argument("--layer", type=int, default=None, help="edit layer (default: RomeConfig's rule)")
    parser.add_argument(
        "--early-stop-loss", type=float, default=None, help="RomeConfig.early_stop_loss override"
    )
    parser.add_argument("--v-num-steps", type=int, default=None, help="RomeConfig.v_num_steps override")
    parser.add_argument("--output", type=Path, default=RESULTS / "rome.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    results = {"model": "SmolLM2-135M-Instruct", "threads": torch.get_num_threads(), "runs": []}
    references = {}
    for covariance in args.covariance:
        for name in args.data:
            cases = load_counterfact(FILES[name], limit=args.limit)
            print(f"{name}, covariance={covariance}: {len(cases)} cases")
            if name not in references:  # the unedited model's answers, once per data file
                references[name] = pre_edit_reference(model, tokenizer, cases, SETTINGS)
            overrides = {
                "layer": args.layer,
                "early_stop_loss": args.early_stop_loss,
                "v_num_steps": args.v_num_steps,
            }
            overrides = {k: v for k, v in overrides.items() if v is not None}
            summary, result = run(model, tokenizer, cases, covariance, overrides, references[name])
            results["runs"].append(
                {
                    "data": name,
                    "covariance": covariance,
                    "summary": summary,
                    "baseline": result.baseline,
                    "records": result.records,
                }
            )

    columns = [*COLUMNS, "setup_seconds"]
    print("\n| data | covariance | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for run_ in results["runs"]:
        s = run_["summary"]
        print(
            f"| {run_['data']} | {run_['covariance']} | " + " | ".join(f"{s[c]:.2f}" for c in columns) + " |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
