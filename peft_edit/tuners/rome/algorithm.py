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
from ...edit_site import AlignedBatch, EditSiteRunner
from ...requests import EditRequest, fill, pad_token_id, subject_last_token_index, tokenize_continuation


@dataclass
class RewriteRows:
    """The token rows of one request: prefixed rewrite prompts (+ target) and KL prompts."""

    ids: list[list[int]]
    sites: list[int]  # subject's last token in each row
    target_ids: list[list[int]]  # per rewrite row
    target_positions: list[list[int]]  # per rewrite row: the token whose logits predict each target token
    kl_last: list[int]  # per KL row: its last token
    n_rewrite: int


def build_rows(
    tokenizer, request: EditRequest, context_templates: list[str], kl_prompts: list[str]
) -> RewriteRows:
    ids, sites, targets, positions, kl_last = [], [], [], [], []
    for context in context_templates:
        template = context.replace("{}", request.template)
        prompt_ids, target_ids = tokenize_continuation(
            tokenizer, fill(template, request.subject), request.target_new
        )
        ids.append(prompt_ids + target_ids[:-1])
        sites.append(subject_last_token_index(tokenizer, template, request.subject))
        targets.append(target_ids)
        positions.append([len(prompt_ids) - 1 + j for j in range(len(target_ids))])
    for template in kl_prompts:
        prompt_ids = tokenizer(fill(template, request.subject))["input_ids"]
        ids.append(prompt_ids)
        sites.append(subject_last_token_index(tokenizer, template, request.subject))
        kl_last.append(len(prompt_ids) - 1)
    return RewriteRows(ids, sites, targets, positions, kl_last, n_rewrite=len(context_templates))


@dataclass
class KeyValue:
    k_star: torch.Tensor  # (in,)
    u: torch.Tensor  # (in,): C⁻¹k* / (k*ᵀC⁻¹k*)
    delta: torch.Tensor  # (out,)
    v_norm: float  # norm of the site's original output at the subject (mean over prompts): the clamp's scale
    final_loss: float
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
    rows = build_rows(tokenizer, request, context_templates, hp.kl_prompts)
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    batch = AlignedBatch.build(rows.ids, rows.sites, pad_id, device=device)
    n = rows.n_rewrite

    # (row, column) pairs whose logits the loss reads, and the target token at each.
    nll_rows, nll_cols, nll_tokens, nll_weights = [], [], [], []
    for r in range(n):
        for pos, tok in zip(rows.target_positions[r], rows.target_ids[r]):
            nll_rows.append(r)
            nll_cols.append(batch.suffix_column(r, pos))
            nll_tokens.append(tok)
            nll_weights.append(1.0 / (len(rows.target_ids[r]) * n))  # mean over tokens, then over prompts
    kl_rows = list(range(n, len(rows.ids)))
    kl_cols = [batch.suffix_column(r, last) for r, last in zip(kl_rows, rows.kl_last)]
    nll_tokens = torch.tensor(nll_tokens, device=device)
    nll_weights = torch.tensor(nll_weights, device=device)

    was_training = model.training
    model.eval()
    try:
        with EditSiteRunner(model, layout, layer, site, batch) as runner:
            k_star = runner.site_input[:n].mean(0)
            u = update_direction(k_star, solve_covariance)
            reach = (runner.site_input.double() @ u.double()).float()[:, None]  # uᵀk_i for every row
            v_init = runner.site_output[:n].mean(0)
            max_norm = hp.clamp_norm_factor * v_init.norm()
            delta = torch.zeros_like(v_init, requires_grad=True)
            optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
            kl_reference = None
            # Keep the best δ seen: on some models a large step overshoots, and the last iterate is worse.
            best_loss, best_delta, step = float("inf"), delta.detach().clone(), 0
            for step in range(1, hp.v_num_steps + 1):
                optimizer.zero_grad()
                hidden = runner.final_hidden(reach * delta)
                logp = runner.log_probs(hidden, nll_rows + kl_rows, nll_cols + kl_cols)
                nll = -(logp[: len(nll_rows)].gather(1, nll_tokens[:, None]).squeeze(1) * nll_weights).sum()
                kl_logp = logp[len(nll_rows) :]
                if kl_reference is None:
                    kl_reference = kl_logp.detach()  # δ = 0 on the first step: the unedited predictions
                kl = torch.nn.functional.kl_div(kl_logp, kl_reference, log_target=True, reduction="batchmean")
                decay = hp.v_weight_decay * delta.norm() ** 2 / v_init.norm() ** 2
                loss = nll + hp.kl_factor * kl + decay
                if loss.item() < best_loss:
                    best_loss, best_delta = loss.item(), delta.detach().clone()
                # Stop once the new target is reached (ROME stopped on the whole loss, whose KL and
                # norm terms often keep it above the threshold for all steps without changing the edit).
                if nll.item() < hp.early_stop_loss:
                    best_loss, best_delta = loss.item(), delta.detach().clone()
                    break
                if step == hp.v_num_steps:
                    break  # the last step's loss is measured, not followed by another update
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
    finally:
        model.train(was_training)
    return KeyValue(
        k_star=k_star, u=u, delta=best_delta, v_norm=float(v_init.norm()), final_loss=best_loss, steps=step
    )


def update_direction(k_star: torch.Tensor, solve_covariance) -> torch.Tensor:
    """u = C⁻¹k* / (k*ᵀ C⁻¹ k*), so that uᵀk* = 1. ``solve_covariance(k)`` returns C⁻¹k (k itself when C = I)."""
    k = k_star.double()
    c_inv_k = solve_covariance(k).double()
    return (c_inv_k / (k @ c_inv_k)).float()


def rank_one_factors(u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: factors (A, B) of ΔW = B A = δ uᵀ."""
    return u.float()[None, :], delta.float()[:, None]
