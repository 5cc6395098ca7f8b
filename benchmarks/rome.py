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
import resource
import statistics
import time
from pathlib import Path

import torch

from peft_edit import RomeConfig, get_edited_model
from peft_edit.data import load_counterfact
from peft_edit.demo import load_smollm2
from peft_edit.evaluation.metrics import greedy_continuations, starts_with_answer, teacher_forced

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {
    "counterfact-easyedit": DATA / "counterfact_easyedit_edit_first2000.json",
    "counterfact-rome": DATA / "counterfact_rome_sample500.json",
}
COVARIANCE = {"identity": "identity", "sampled": None, "wikitext": str(DATA / "wikitext_wiki.valid.raw")}
RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def score_case(model, tokenizer, case, before):
    """All per-case numbers; ``before`` holds the unedited model's neighbour answers."""
    req = case.request
    prompts = [req.filled_prompt, *case.rephrases]
    new = teacher_forced(model, tokenizer, prompts, [req.target_new] * len(prompts))
    true = teacher_forced(model, tokenizer, prompts, [req.target_true] * len(prompts))
    nb_prompts = [n.prompt for n in case.neighbors]
    nb_true = teacher_forced(model, tokenizer, nb_prompts, [n.answer for n in case.neighbors])
    nb_new = teacher_forced(model, tokenizer, nb_prompts, [req.target_new] * len(nb_prompts))
    gen = greedy_continuations(model, tokenizer, prompts, len(new[0].answer_ids))
    nb_gen = greedy_continuations(model, tokenizer, nb_prompts, [len(t.answer_ids) for t in before["tf"]])

    def mean(xs):
        return sum(xs) / len(xs)

    return {
        "efficacy_prob": float(new[0].mean_logprob > true[0].mean_logprob),
        "paraphrase_prob": mean([float(n.mean_logprob > t.mean_logprob) for n, t in zip(new[1:], true[1:])]),
        "neighborhood_prob": mean([float(t.mean_logprob > n.mean_logprob) for t, n in zip(nb_true, nb_new)]),
        "reliability_tf": new[0].token_accuracy,
        "generalization_tf": mean([n.token_accuracy for n in new[1:]]),
        "locality_tf": mean(
            [
                mean([float(a == b) for a, b in zip(t.argmax_ids, p.argmax_ids)])
                for t, p in zip(nb_true, before["tf"])
            ]
        ),
        "reliability_gen": float(starts_with_answer(gen[0], req.target_new)),
        "generalization_gen": mean([float(starts_with_answer(g, req.target_new)) for g in gen[1:]]),
        "locality_gen": mean([float(a == b) for a, b in zip(nb_gen, before["gen"])]),
    }


def run(model, tokenizer, cases, covariance: str, overrides: dict):
    config = RomeConfig(stats_corpus=COVARIANCE[covariance], **overrides)
    # Neighbour answers of the unedited model, computed once.
    before = []
    for case in cases:
        prompts = [n.prompt for n in case.neighbors]
        tf = teacher_forced(model, tokenizer, prompts, [n.answer for n in case.neighbors])
        before.append(
            {
                "tf": tf,
                "gen": greedy_continuations(model, tokenizer, prompts, [len(t.answer_ids) for t in tf]),
            }
        )

    # One-time setup (prefix sampling, covariance statistics) is timed apart from the edits.
    started = time.perf_counter()
    warm = get_edited_model(model, config, tokenizer=tokenizer)
    warm.base_model.context_templates(warm.peft_config["default"], tokenizer)
    warm.base_model.covariance_solver(warm.peft_config["default"], tokenizer)
    model = warm.unload_edits()
    setup_seconds = time.perf_counter() - started

    records, seconds = [], []
    for case, pre in zip(cases, before):
        started = time.perf_counter()
        edited = get_edited_model(model, config, requests=[case.request], tokenizer=tokenizer, progress=False)
        seconds.append(time.perf_counter() - started)
        scores = score_case(edited, tokenizer, case, pre)
        model = edited.unload_edits()
        records.append({"case_id": case.case_id, "seconds": seconds[-1], **scores})
        print(
            f"  case {case.case_id}: {seconds[-1]:.1f}s "
            + " ".join(f"{k}={v:.2f}" for k, v in scores.items())
        )
    keys = [k for k in records[0] if k not in ("case_id", "seconds")]
    summary = {k: statistics.mean(r[k] for r in records) for k in keys}
    summary.update(
        seconds_per_edit=statistics.mean(seconds),
        setup_seconds=setup_seconds,
        peak_rss_mb=peak_rss_mb(),
        layer=config.layer,
        cases=len(records),
    )
    return model, summary, records


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
    for covariance in args.covariance:
        for name in args.data:
            cases = load_counterfact(FILES[name], limit=args.limit)
            print(f"{name}, covariance={covariance}: {len(cases)} cases")
            overrides = {
                "layer": args.layer,
                "early_stop_loss": args.early_stop_loss,
                "v_num_steps": args.v_num_steps,
            }
            overrides = {k: v for k, v in overrides.items() if v is not None}
            model, summary, records = run(model, tokenizer, cases, covariance, overrides)
            results["runs"].append(
                {"data": name, "covariance": covariance, "summary": summary, "records": records}
            )

    columns = [k for k in results["runs"][0]["summary"] if k not in ("layer", "cases")]
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
