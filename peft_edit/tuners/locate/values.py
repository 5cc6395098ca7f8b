"""The value change δ: per request, a vector added at the subject's last token that makes the model say the target.

For requests r = 1..N and one edit site (an MLP output projection), each request gets rows: its
prompt after every sampled prefix, followed by the target's tokens, and its KL prompts. One
optimisation runs all requests' rows together (the requests do not interact: each δ_r only
reaches its own rows), minimising per request

    NLL(target | prefixed prompts)  +  kl_factor · KL(KL prompts, unedited)  +  decay · ||δ_r||²/||v_r||²

with ||δ_r|| clamped to ``clamp_norm_factor · ||v_r||`` (v_r: the site's original output, or
the hidden state there for MEMIT) and an
early stop per request once its target's NLL is below ``early_stop_loss``; the best δ_r seen is kept.

ROME scales δ per row by how much of it the rank-one update will deliver there (``reach``);
MEMIT and AlphaEdit apply δ as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...edit_site import AlignedBatch, EditSiteRunner
from ...requests import EditRequest, fill, subject_last_token_index, tokenize_continuation


@dataclass
class RewriteRows:
    """Token rows of a list of requests: each request's prefixed prompts (+ target), then its KL prompts."""

    ids: list[list[int]]
    sites: list[int]  # subject's last token in each row
    request_of_row: list[int]
    rewrite_rows: list[list[int]]  # per request: its prefixed-prompt rows
    kl_rows: list[list[int]]  # per request: its KL rows
    target_ids: dict[int, list[int]]  # per rewrite row
    # per rewrite row: the tokens whose logits predict each target token
    target_positions: dict[int, list[int]]
    kl_last: dict[int, int]  # per KL row: its last token

    def suffix_widths(self) -> list[int]:
        """Per request: the tokens from its subject's last token to the end of its longest row.

        Rows optimised together are aligned at the subject and padded to the widest of them, and
        every column from the subject on is recomputed at each step.
        """
        widths = [0] * len(self.rewrite_rows)
        for row, (ids, site) in enumerate(zip(self.ids, self.sites)):
            request = self.request_of_row[row]
            widths[request] = max(widths[request], len(ids) - site)
        return widths


def build_rows(tokenizer, requests: list[EditRequest], context_templates: list[str], kl_prompts: list[str]):
    rows = RewriteRows([], [], [], [], [], {}, {}, {})
    for i, request in enumerate(requests):
        rewrite, kl = [], []
        for context in context_templates:
            template = context.replace("{}", request.template)
            prompt_ids, target_ids = tokenize_continuation(
                tokenizer, fill(template, request.subject), request.target_new
            )
            r = len(rows.ids)
            rows.ids.append(prompt_ids + target_ids[:-1])
            rows.sites.append(subject_last_token_index(tokenizer, template, request.subject))
            rows.target_ids[r] = target_ids
            rows.target_positions[r] = [len(prompt_ids) - 1 + j for j in range(len(target_ids))]
            rows.request_of_row.append(i)
            rewrite.append(r)
        for template in kl_prompts:
            prompt_ids = tokenizer(fill(template, request.subject))["input_ids"]
            r = len(rows.ids)
            rows.ids.append(prompt_ids)
            rows.sites.append(subject_last_token_index(tokenizer, template, request.subject))
            rows.kl_last[r] = len(prompt_ids) - 1
            rows.request_of_row.append(i)
            kl.append(r)
        rows.rewrite_rows.append(rewrite)
        rows.kl_rows.append(kl)
    return rows


@dataclass
class Deltas:
    delta: torch.Tensor  # (N, out): the best δ per request
    v_init: torch.Tensor  # (N, out): the site's original output, mean over each request's prompts
    target_nll: torch.Tensor  # (N,): the target's NLL with the returned δ (as last measured)
    steps: int


class ValueProblem:
    """The rows of a batch of requests, aligned at their subjects, with the loss's index bookkeeping."""

    def __init__(self, tokenizer, requests, context_templates, kl_prompts, pad_id: int, device):
        self.rows = build_rows(tokenizer, requests, context_templates, kl_prompts)
        self.n_requests = len(requests)
        self.batch = AlignedBatch.build(self.rows.ids, self.rows.sites, pad_id, device=device)
        rows = self.rows
        nll_rows, nll_cols, tokens, weights, owner = [], [], [], [], []
        for i, rewrite in enumerate(rows.rewrite_rows):
            for r in rewrite:
                targets = rows.target_ids[r]
                for pos, tok in zip(rows.target_positions[r], targets):
                    nll_rows.append(r)
                    nll_cols.append(self.batch.suffix_column(r, pos))
                    tokens.append(tok)
                    weights.append(1.0 / (len(targets) * len(rewrite)))  # mean over tokens, then prompts
                    owner.append(i)
        kl_rows = [r for group in rows.kl_rows for r in group]
        self.read_rows = torch.tensor(nll_rows + kl_rows, device=device, dtype=torch.long)
        self.read_cols = torch.tensor(
            nll_cols + [self.batch.suffix_column(r, rows.kl_last[r]) for r in kl_rows],
            device=device,
            dtype=torch.long,
        )
        self.n_nll = len(nll_rows)
        self.nll_tokens = torch.tensor(tokens, device=device)
        self.nll_weights = torch.tensor(weights, device=device)
        self.nll_owner = torch.tensor(owner, device=device)
        self.kl_owner = torch.tensor(
            [rows.request_of_row[r] for r in kl_rows], device=device, dtype=torch.long
        )
        kl_count = torch.bincount(self.kl_owner, minlength=self.n_requests).clamp(min=1)
        self.kl_weight = 1.0 / kl_count.float()
        self.request_of_row = torch.tensor(rows.request_of_row, device=device)

    def rewrite_mean(self, per_row: torch.Tensor) -> torch.Tensor:
        """(N, ...) mean of ``per_row`` over each request's prefixed-prompt rows."""
        return torch.stack([per_row[rows].mean(0) for rows in self.rows.rewrite_rows])


def optimise_deltas(
    runner: EditSiteRunner,
    problem: ValueProblem,
    hp,
    reach: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> Deltas:
    """Optimise δ for every request of ``problem`` at ``runner``'s site (see the module docstring).

    ``reach`` (rows,) scales each row's δ (ROME: uᵀk of the row); None applies δ as it is.
    ``scale`` (N,) is the norm the clamp and the decay are relative to: by default the site's
    original output (ROME); MEMIT passes the hidden state's norm at that block, as in its paper.
    """
    n = problem.n_requests
    v_init = problem.rewrite_mean(runner.site_output)
    v_norm = v_init.norm(dim=1) if scale is None else scale.to(v_init)
    max_norm = hp.clamp_norm_factor * v_norm
    row_scale = (
        reach if reach is not None else torch.ones(len(problem.request_of_row), device=v_init.device)
    )[:, None]
    row_scale = row_scale.to(v_init)

    delta = torch.zeros_like(v_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_reference = None
    best_loss = torch.full((n,), float("inf"), device=v_init.device)
    best_delta = delta.detach().clone()
    best_nll = torch.full((n,), float("inf"), device=v_init.device)
    done = torch.zeros(n, dtype=torch.bool, device=v_init.device)
    computed = ComputedRows(problem)
    step = 0
    for step in range(1, hp.v_num_steps + 1):
        optimizer.zero_grad()
        rows = computed.rows
        hidden = runner.final_hidden(row_scale[rows] * delta[problem.request_of_row[rows]])
        nll_reads, kl_reads, n_nll = computed.nll_reads, computed.kl_reads, computed.n_nll
        logp = runner.log_probs(hidden, *computed.read_positions)
        token_nll = -logp[:n_nll].gather(1, problem.nll_tokens[nll_reads][:, None]).squeeze(1)
        nll = token_nll.new_zeros(n).index_add(
            0, problem.nll_owner[nll_reads], token_nll * problem.nll_weights[nll_reads]
        )
        kl_logp = logp[n_nll:]
        if kl_reference is None:
            kl_reference = kl_logp.detach()  # δ = 0 on the first step (every row computed): unedited
        reference = kl_reference[kl_reads]
        row_kl = (reference.exp() * (reference - kl_logp)).sum(-1)
        kl = row_kl.new_zeros(n).index_add(0, problem.kl_owner[kl_reads], row_kl) * problem.kl_weight
        decay = hp.v_weight_decay * delta.norm(dim=1) ** 2 / v_norm**2
        loss = nll + hp.kl_factor * kl + decay  # a dropped request's terms are 0 here, and unused

        with torch.no_grad():
            # Keep the best δ seen (a large step can overshoot) and freeze requests already reached.
            improved = (loss < best_loss) & ~done
            reached = (nll < hp.early_stop_loss) & ~done
            take = improved | reached
            best_loss = torch.where(take, loss.detach(), best_loss)
            best_nll = torch.where(take, nll.detach(), best_nll)
            best_delta[take] = delta.detach()[take]
            done |= reached
        if bool(done.all()) or step == hp.v_num_steps:
            break  # the last step's loss is measured, not followed by another update
        loss[~done].sum().backward()
        optimizer.step()
        with torch.no_grad():
            delta[done] = best_delta[done]
            norms = delta.norm(dim=1)
            too_long = norms > max_norm
            delta[too_long] *= (max_norm[too_long] / norms[too_long])[:, None]
        computed.drop_done(runner, done)
    return Deltas(delta=best_delta, v_init=v_init, target_nll=best_nll, steps=step)


class ComputedRows:
    """The rows of a problem still computed at each step: a request's rows are dropped once it is done.

    Requests optimised together finish after different numbers of steps (CounterFact, 40 requests:
    8-25), and their rows would otherwise be recomputed until the last one finishes (a quarter of
    the work with 4 requests at a time).
    """

    def __init__(self, problem: ValueProblem):
        self.problem = problem
        n_rows = len(problem.request_of_row)
        device = problem.request_of_row.device
        self.rows = torch.arange(n_rows, device=device)  # problem rows, in the runner's order
        self.position = self.rows.clone()  # problem row -> its row in the runner (-1: dropped)
        self._set_reads(torch.ones(n_rows, dtype=torch.bool, device=device))

    def _set_reads(self, kept: torch.Tensor) -> None:
        """The reads of the ``kept`` problem rows, worked out once per change, not at every step."""
        p = self.problem
        reads = kept[p.read_rows]
        self.nll_reads, self.kl_reads = reads[: p.n_nll], reads[p.n_nll :]
        self.n_nll = int(self.nll_reads.sum())
        # (runner rows, suffix columns) of those reads: NLL reads first, then KL.
        self.read_positions = (self.position[p.read_rows[reads]], p.read_cols[reads])

    def drop_done(self, runner: EditSiteRunner, done: torch.Tensor) -> None:
        """Stop computing the rows of requests in ``done`` (where the runner can drop rows)."""
        kept = ~done[self.problem.request_of_row]
        rows = kept.nonzero().squeeze(1)
        if len(rows) == len(self.rows) or not runner.can_drop_rows:
            return
        runner.keep_rows(self.position[rows].tolist())
        self.rows = rows
        self.position = torch.full_like(self.position, -1)
        self.position[rows] = torch.arange(len(rows), device=rows.device)
        self._set_reads(kept)
