"""MEMIT's and AlphaEdit's solves on the same target values: one batch of N CounterFact edits on SmolLM2.

    python benchmarks/solve_variants.py --edits 500 --score 100

The target values z (step 1 of MEMIT, shared by AlphaEdit) are the slow part on a CPU and do not
depend on the solve, so they are optimised once (saved beside the results and resumed after an
interruption); each solve is then spread over the edited layers, applied as forward hooks (no
adapter) and scored on every (N / score)-th case through the evaluation harness's probes.
Probability and teacher-forced scores only. The solves: MEMIT at its default λ and at a small one
(which lets it write more onto ordinary text), AlphaEdit at its default and with a larger ridge.
Writes ``benchmarks/results/solve_variants_<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from batch import KEYS, cases_for, smollm2_for_alphaedit
from common import RESULTS, add_device_argument

import peft_edit  # noqa: F401  (registers the methods)
from peft_edit.architectures import mlp_out_name
from peft_edit.evaluation import ScoreSettings
from peft_edit.evaluation.scoring import case_metrics, run_probes, summarize
from peft_edit.tuners.alphaedit.algorithm import nullspace_projector, projected_factors
from peft_edit.tuners.memit.algorithm import (
    RequestRows,
    applied,
    compute_deltas,
    least_squares_factors,
    spread_over_layers,
)
from peft_edit.tuners.per_model import context_templates, second_moments

SCORES = [key for key in KEYS if key.endswith(("_prob", "_tf"))]  # no generation here


def solves(moments: dict[int, torch.Tensor], layers: list[int]) -> dict:
    def memit(weight: float):
        return lambda layer, K, R: least_squares_factors(K, R, moments[layer], weight)

    def alphaedit(threshold: float, regularization: float):
        projectors = {layer: nullspace_projector(moments[layer], threshold) for layer in layers}
        return lambda layer, K, R: projected_factors(
            K,
            R,
            projectors[layer],
            torch.zeros_like(projectors[layer]),
            regularization * float(moments[layer].trace()),
        )

    d = next(iter(moments.values())).shape[0]
    return {
        "alphaedit (default: threshold 1, regularization 0.05)": alphaedit(1.0, 0.05),
        "alphaedit (regularization 0.5)": alphaedit(1.0, 0.5),
        f"memit (default: λ = d = {d})": memit(float(d)),
        "memit (λ = 100)": memit(100.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--edits", type=int, default=500)
    parser.add_argument("--score", type=int, default=100, help="cases scored (evenly spaced over the edits)")
    add_device_argument(parser)
    args = parser.parse_args()

    model, tokenizer, config = smollm2_for_alphaedit(args.device)
    layers, layout = list(config.layers), config.layout(model)
    moments = second_moments(model, tokenizer, config, layers)
    templates = context_templates(model, tokenizer, config)
    cases = cases_for(args.edits)
    requests = [c.request for c in cases]
    rows = RequestRows(tokenizer, requests, templates)
    _, hidden = rows.read(model, layout, layers[0], layers[-1])

    values_file = RESULTS / f"solve_variants_{args.edits}_values.pt"
    found = torch.load(values_file) if values_file.is_file() else []
    started = time.perf_counter()
    while (done := sum(len(d) for d in found)) < len(requests):
        chunk = requests[done : done + 40]
        norms = hidden[done : done + len(chunk)].norm(dim=1)
        found.append(
            compute_deltas(model, tokenizer, chunk, layout, layers[-1], templates, config, norms).cpu()
        )
        torch.save(found, values_file)
        print(
            f"target values: {done + len(chunk)} / {len(requests)}, {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    target = hidden + torch.cat(found).to(hidden)

    scored = cases[:: max(1, args.edits // args.score)][: args.score]
    settings = ScoreSettings(generation_tokens=0)
    before = run_probes(model, tokenizer, scored, settings)
    output_file = RESULTS / f"solve_variants_{args.edits}.json"
    output = {
        "edits": args.edits,
        "scored_cases": len(scored),
        "unedited": summarize([case_metrics(c, o, o) for c, o in zip(scored, before)], SCORES),
        "solves": {},
    }
    print("unedited", json.dumps({k: round(v, 3) for k, v in output["unedited"].items()}))
    for name, solve in solves(moments, layers).items():
        factors, _ = spread_over_layers(model, rows, layout, layers, target, solve)
        with applied(model, {mlp_out_name(layout, layer): f for layer, f in factors.items()}):
            after = run_probes(model, tokenizer, scored, settings)
        output["solves"][name] = summarize(
            [case_metrics(c, a, b) for c, a, b in zip(scored, after, before)], SCORES
        )
        output_file.write_text(json.dumps(output, indent=1))
        print(name, json.dumps({k: round(v, 3) for k, v in output["solves"][name].items()}), flush=True)
    print(f"wrote {output_file}")


if __name__ == "__main__":
    main()
