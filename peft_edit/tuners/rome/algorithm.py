"""ROME's maths, step by step, in the paper's notation.

For one request (subject s, prompt p, new object o*) at the MLP output projection W of block L:

1. k*  — the key: W's input at the subject's last token, averaged over p preceded by sampled prefixes.
2. δ   — the value change: a vector added to W's output at that token, optimised so the model
         predicts o* after every prefixed prompt, with a KL term that keeps "{s} is a" predictions
         and a norm clamp. The new value is v* = W k* + δ.
3. ΔW  — the rank-one update that maps k* to v* while disturbing other keys least under their
         covariance C:  ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*) = δ uᵀ,  u = C⁻¹k* / (k*ᵀC⁻¹k*).

The same averaged k* is used in step 3 as in step 1, so ΔW k* = δ exactly (the fix of R-ROME; the
original implementation used the un-prefixed key in the denominator, which made edits unstable).

u depends only on k*, which is known before δ is optimised, so step 2 optimises the edit as it
will act: a prompt whose key is k_i receives (uᵀk_i) δ, not δ. Without this, prompts whose key
is far from the average (typically the bare prompt, without a prefix) got as little as a third of
δ after the update and the edit failed there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...architectures import Layout
from ...edit_site import EditSiteRunner
from ...requests import EditRequest, pad_token_id
from ..locate.values import ValueProblem, optimise_deltas


@dataclass
class KeyValue:
    k_star: torch.Tensor  # (in,)
    u: torch.Tensor  # (in,): C⁻¹k* / (k*ᵀC⁻¹k*)
    delta: torch.Tensor  # (out,)
    v_norm: float  # norm of the site's original output at the subject (mean over prompts): the clamp's scale
    target_nll: float
    steps: int


def compute_key_and_delta(
    model: nn.Module,
    tokenizer,
    request: EditRequest,
    layout: Layout,
    layer: int,
    site: nn.Module,
    context_templates: list[str],
    hp,
    solve_covariance,
) -> KeyValue:
    """Steps 1 and 2: k* and δ, sharing one set of forward passes (``solve_covariance(k) = C⁻¹k``)."""
    device = next(model.parameters()).device
    problem = ValueProblem(
        tokenizer, [request], context_templates, hp.kl_prompts, pad_token_id(tokenizer), device
    )
    was_training = model.training
    model.eval()
    try:
        with EditSiteRunner(model, layout, layer, site, problem.batch) as runner:
            k_star = problem.rewrite_mean(runner.site_input)[0]
            u = update_direction(k_star, solve_covariance)
            reach = (runner.site_input.double() @ u.double()).float()  # uᵀk_i for every row
            found = optimise_deltas(runner, problem, hp, reach=reach)
    finally:
        model.train(was_training)
    return KeyValue(
        k_star=k_star,
        u=u,
        delta=found.delta[0],
        v_norm=float(found.v_init[0].norm()),
        target_nll=float(found.target_nll[0]),
        steps=found.steps,
    )


def update_direction(k_star: torch.Tensor, solve_covariance) -> torch.Tensor:
    """u = C⁻¹k* / (k*ᵀ C⁻¹ k*), so that uᵀk* = 1. ``solve_covariance(k)`` returns C⁻¹k (k itself when C = I)."""
    k = k_star.double()
    c_inv_k = solve_covariance(k).double()
    return (c_inv_k / (k @ c_inv_k)).float()


def rank_one_factors(u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: factors (A, B) of ΔW = B A = δ uᵀ."""
    return u.float()[None, :], delta.float()[:, None]
