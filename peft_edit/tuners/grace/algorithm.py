"""GRACE's value: the output an MLP must give at a prompt's last token for the model to emit a target.

For one edit, the rows are the prompt followed by the target's tokens (teacher forcing); the
value v replaces the wrapped module's output at the last prompt token of every row, and is
optimised (Adam) to minimise the target's negative log-likelihood, until every target token is
the greedy choice by enough (:class:`StopRule`). When an entry is shared by
several prompts (its radius was widened to cover a paraphrase with the same target), all of
them are rows, so the shared value keeps serving each.

Only what v can reach is recomputed at each step: positions before the last prompt token are
cached, blocks below the codebook's block are replayed, and the LM head runs only where the loss
reads logits (:class:`~peft_edit.edit_site.EditSiteRunner`), over a shortlist of the vocabulary
between full refreshes (:class:`~peft_edit.edit_site.TargetLogProbs`). With ``compute_dtype`` the
blocks a step runs work in that dtype; the stop rule is confirmed at the model's own precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...architectures import Layout
from ...edit_site import AlignedBatch, EditSiteRunner, TargetLogProbs

# Adam's moment decay for the value. The value travels far (about 15-20 times the module's own
# output on SmolLM2) in few steps, and shorter memories than torch's (0.9, 0.999) follow the
# changing gradient sooner: with the learning rate at 2, SmolLM2 reached every target in 40 % fewer
# steps on 19 hallucination corrections (605 against 1,017) and 36 % fewer on 39 zsRE questions
# (328 against 510); the same betas at learning rate 1 saved 25 %, learning rate 2 alone 17 %.
VALUE_BETAS = (0.8, 0.99)


@dataclass
class StopRule:
    """Whether a value's optimisation is done, judged on the target tokens' log-probabilities
    (``GraceConfig.stop_rule``, ``early_stop_prob``, ``stop_margin``); ``rows`` says which row each
    target token belongs to."""

    rule: str
    stop_logp: float
    margin: float | None
    rows: torch.Tensor

    def __call__(self, token_logp: torch.Tensor, targets: TargetLogProbs) -> bool:
        """As measured by the last call of ``targets`` (its :attr:`~TargetLogProbs.leads`)."""
        logp = token_logp.detach()
        if self.rule == "every_token":
            held = logp > self.stop_logp
            if self.margin is not None:
                held |= targets.leads >= self.margin
            return bool(held.all())
        # "mean": every token the greedy choice, and each row's mean log-probability above the bar.
        if not bool((targets.leads > (self.margin or 0.0)).all()):
            return False
        n_rows = int(self.rows.max()) + 1
        sums = torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add_(0, self.rows, logp)
        counts = torch.bincount(self.rows, minlength=n_rows).to(logp.dtype)
        return bool((sums / counts > self.stop_logp).all())


def teacher_forced_ids(rows: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    """The token rows that (prompt ids, target ids) pairs are run as: the prompt, then the target but its last token."""
    return [prompt + target[:-1] for prompt, target in rows]


@dataclass
class Value:
    value: torch.Tensor  # (out,)
    keys: torch.Tensor  # (rows, in): the wrapped module's input at each row's last prompt token
    token_keys: list[torch.Tensor]  # per row, its input at every token of prompt + target[:-1]
    loss: float  # mean negative log-likelihood of the targets with this value
    steps: int


def optimise_value(
    model: nn.Module,
    layout: Layout,
    layer: int,
    site: nn.Module,
    rows: list[tuple[list[int], list[int]]],
    pad_id: int,
    hp,
    start: torch.Tensor | None = None,
) -> Value:
    """Optimise the value for ``rows`` of (prompt ids, target ids); ``start`` is the initial value.

    Without ``start``, optimisation begins at the module's own output on the first row, so the
    value only moves as far as the target needs. The value replaces whatever reaches the last
    prompt token (an entry stored there included); every other position sees the codebook as it
    stands, as it will when the edit is used: a passage whose beginning is another edit's prompt
    gets that edit's value at that position.
    """
    ids = teacher_forced_ids(rows)
    sites = [len(prompt) - 1 for prompt, _ in rows]
    device = next(model.parameters()).device
    batch = AlignedBatch.build(ids, sites, pad_id, device=device)
    loss_rows, loss_cols, loss_tokens, loss_weights = [], [], [], []
    for r, (prompt, target) in enumerate(rows):
        for j, token in enumerate(target):
            loss_rows.append(r)
            loss_cols.append(batch.suffix_column(r, len(prompt) - 1 + j))
            loss_tokens.append(token)
            loss_weights.append(1.0 / (len(target) * len(rows)))  # mean over tokens, then rows
    loss_tokens = torch.tensor(loss_tokens, device=device)
    loss_weights = torch.tensor(loss_weights, device=device)
    holds = StopRule(
        hp.stop_rule, math.log(hp.early_stop_prob), hp.stop_margin, torch.tensor(loss_rows, device=device)
    )

    was_training = model.training
    model.eval()
    try:
        compute_dtype = hp.torch_compute_dtype
        with EditSiteRunner(
            model, layout, layer, site, batch, keep_token_inputs=True, compute_dtype=compute_dtype
        ) as runner:
            arriving = runner.site_output  # (rows, out): what reaches the last prompt token now
            keys = runner.site_input.clone()
            token_keys = runner.token_site_inputs
            with torch.no_grad():  # the module's own output there, whatever the codebook holds
                base = site.get_base_layer()
                own_output = base(keys.to(next(base.parameters()).dtype)).float()
            value = (own_output[0] if start is None else start.float()).clone().requires_grad_(True)
            # The step size scales with the module's output (its RMS per coordinate), so one default
            # suits every model and layer.
            scale = own_output[0].pow(2).mean().sqrt().item()
            optimizer = torch.optim.Adam([value], lr=hp.value_lr * scale, betas=VALUE_BETAS)
            targets = TargetLogProbs(model, loss_rows, loss_cols, loss_tokens, refresh_dtype=compute_dtype)
            best_loss, best_value, step, done = float("inf"), value.detach().clone(), 0, False
            for step in range(hp.value_steps + 1):
                optimizer.zero_grad()
                hidden = runner.final_hidden(value[None, :] - arriving)  # output becomes `value` on every row
                token_logp = targets(hidden)
                loss = -(token_logp * loss_weights).sum()
                if loss.item() < best_loss:
                    best_loss, best_value = loss.item(), value.detach().clone()
                # Done once every target token is the greedy choice, by enough; a mean-loss threshold
                # alone would keep polishing short targets and leave some token of a long one behind.
                if holds(token_logp, targets):
                    if runner.lowered:  # a result is judged at the model's own precision
                        with torch.no_grad(), runner.full_precision():
                            hidden = runner.final_hidden(value.detach()[None, :] - arriving)
                    if runner.lowered or not targets.exact:
                        token_logp = targets.full(hidden)
                    if holds(token_logp, targets):
                        best_value, done = value.detach().clone(), True
                        best_loss = -(token_logp * loss_weights).sum().item()
                        break
                if step == hp.value_steps:
                    break  # the last loss is measured, not followed by another update
                loss.backward()
                optimizer.step()
            if not done:  # the best loss seen may come from a shortlist: measure it on the full vocabulary
                with torch.no_grad(), runner.full_precision():
                    token_logp = targets.full(runner.final_hidden(best_value[None, :] - arriving))
                best_loss = -(token_logp * loss_weights).sum().item()
    finally:
        model.train(was_training)
    return Value(value=best_value, keys=keys, token_keys=token_keys, loss=best_loss, steps=step)
