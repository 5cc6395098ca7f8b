"""How much of a null space AlphaEdit finds on SmolLM2, and what its update writes onto ordinary text.

    python benchmarks/nullspace.py                  # layers 4 and 8, batches of 10, 100 and 1,000 keys

AlphaEdit confines its update to directions the preserved keys barely use and drops MEMIT's λC
term, trusting the projection to keep ordinary text unchanged. This measures, per edited layer,
without any value optimisation (keys only, so it runs in minutes on a CPU):

- the projection: how many directions it keeps and what share of the preserved keys' energy
  (trace(P C) / trace(C)) and of the edit keys' energy lies in them;
- per solve, for the first N CounterFact subjects' keys and random residuals R (fixed seed): the
  fit error ‖ΔK − R‖ / ‖R‖, and the leak E_k~C ‖Δk‖² / mean ‖r‖², what the update writes on an
  ordinary-text key relative to what it writes on an edit key.

Writes ``benchmarks/results/nullspace.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from batch import cases_for, smollm2_for_alphaedit
from common import RESULTS, add_device_argument

import peft_edit  # noqa: F401  (registers the methods)
from peft_edit.tuners.alphaedit.algorithm import nullspace_projector, projected_factors
from peft_edit.tuners.memit.algorithm import RequestRows, least_squares_factors
from peft_edit.tuners.per_model import context_templates, second_moments


def solves(moments: torch.Tensor, key_dim: int) -> dict:
    """The solves compared: MEMIT's default and AlphaEdit's at its default and at larger settings."""
    trace = float(moments.trace())
    zero = torch.zeros_like(moments)

    def alphaedit(threshold: float, regularization: float):
        projector = nullspace_projector(moments, threshold)
        return lambda K, R: projected_factors(K, R, projector, zero, regularization * trace)

    return {
        f"memit (λ = d = {key_dim})": lambda K, R: least_squares_factors(K, R, moments, float(key_dim)),
        "alphaedit (default: threshold 1, regularization 0.05)": alphaedit(1.0, 0.05),
        "alphaedit (regularization 0.5)": alphaedit(1.0, 0.5),
        "alphaedit (threshold 0.5)": alphaedit(0.5, 0.05),
    }


def fit_and_leak(A: torch.Tensor, B: torch.Tensor, K: torch.Tensor, R: torch.Tensor, C: torch.Tensor):
    delta = B.double() @ A.double()  # (out, in)
    fit_error = float((K @ delta.T - R).norm() / R.norm())
    leak = float(torch.einsum("oi,ij,oj->", delta, C, delta) / (R.pow(2).sum() / len(R)))
    return round(fit_error, 3), round(leak, 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", nargs="+", type=int, default=None, help="default: first and last edited")
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--output", type=Path, default=RESULTS / "nullspace.json")
    add_device_argument(parser)
    args = parser.parse_args()

    model, tokenizer, config = smollm2_for_alphaedit(args.device)
    layers = args.layers or [config.layers[0], config.layers[-1]]
    layout = config.layout(model)
    moments = second_moments(model, tokenizer, config, layers)
    rows = RequestRows(
        tokenizer,
        [c.request for c in cases_for(max(args.sizes))],
        context_templates(model, tokenizer, config),
    )
    output = {"layers": {}}
    for layer in layers:
        keys = rows.read(model, layout, layer, layer)[0].double().cpu()
        C = moments[layer].double().cpu()
        projections = {}
        for threshold in (1.0, 0.5):
            P = nullspace_projector(C, threshold)
            projections[str(threshold)] = {
                "directions": int(round(float(P.trace()))),
                "of": C.shape[0],
                "preserved_energy_share": round(float(torch.trace(P @ C) / C.trace()), 3),
                "edit_key_energy_share": round(float((keys @ P).pow(2).sum() / keys.pow(2).sum()), 3),
            }
            print(f"layer {layer}, threshold {threshold}: {json.dumps(projections[str(threshold)])}")
        rows_out = []
        generator = torch.Generator().manual_seed(0)
        for n in args.sizes:
            K = keys[:n]
            R = torch.randn(n, model.config.hidden_size, generator=generator, dtype=torch.float64)
            for name, solve in solves(C, C.shape[0]).items():
                fit_error, leak = fit_and_leak(*solve(K, R), K, R, C)
                rows_out.append({"keys": n, "solve": name, "fit_error": fit_error, "leak": leak})
                print(f"layer {layer}  {n:5d} keys  {name:55s} fit error {fit_error:.3f}  leak {leak:.4f}")
        output["layers"][str(layer)] = {"projection": projections, "solves": rows_out}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
