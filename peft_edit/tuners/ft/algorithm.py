"""FT-L and FT-M: fine-tune chosen projections until the model emits the new targets.

Both train a change ΔW of each targeted projection W (the model computes with W + ΔW), every other
parameter frozen, with Adam on all requests of one ``edit()`` call together, stopping early once the
targets' loss is low. They differ in what the loss reads:

* **FT-M** (masked; EasyEdit's ``objective_optimization="target_new"``): the model reads prompt +
  target, and each target token is scored at the position before it, the prompt's tokens masked
  out of the loss: −log P(target | prompt) averaged over the target's tokens, the ordinary
  conditional language-model loss.
* **FT-L** (the fine-tuning baseline of ROME; EasyEdit's ``"prompt_last"``): the model reads the
  prompt alone, and *every* target token is scored at the prompt's last position:
  −meanⱼ log P(tⱼ | prompt). For a one-token target this is the same loss as FT-M's; for a longer
  one it asks the next-token distribution to hold all target tokens at once and never teaches
  the continuation after the first. After every step each element of ΔW is clamped to ±ε, the
  L∞ constraint of Zhu et al. (2020) that gives FT-L its name.

Deliberate differences from those implementations: targets are tokenized in context (after the
prompt and a space; tokenizing ``" " + target`` alone, as they do, puts a BOS token among the
targets of Llama-style tokenizers); all requests form one batch per step, rather than mini-batches
of one looped over per epoch; ΔW is trained as a tensor of its own, dense or as LoRA-style factors
B A (B zero at the start), so what is stored is exactly what was trained.

Blocks below the lowest targeted projection are run once and replayed at every step, and
gradients reach ΔW only (:func:`peft_edit.tuners.site_training.train_added_output`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ...architectures import Layout, in_out_features
from ...edit_site import AlignedBatch
from ...requests import EditRequest, pad_token_id, tokenize_continuation
from ..site_training import TargetRows, TrainResult, build_target_rows, train_added_output


# ----------------------------------------------------------------------------------- the loss
def masked_target_rows(tokenizer, requests: Sequence[EditRequest], device=None) -> TargetRows:
    """FT-M: rows of prompt + target; each target token is predicted at the position before it."""
    return build_target_rows(tokenizer, requests, ["{}"], device=device)


def prompt_last_rows(tokenizer, requests: Sequence[EditRequest], device=None) -> TargetRows:
    """FT-L: rows of the prompt alone; every target token is predicted at the prompt's last position."""
    ids, predicts = [], []
    for request in requests:
        prompt_ids, target_ids = tokenize_continuation(tokenizer, request.filled_prompt, request.target_new)
        ids.append(prompt_ids)
        predicts.append([(len(prompt_ids) - 1, token) for token in target_ids])
    batch = AlignedBatch.build(ids, [0] * len(ids), pad_token_id(tokenizer), device=device)
    n = len(ids)
    return TargetRows(
        batch, list(range(n)), [True] * n, predicts, [len(r) for r in ids], [len(r) - 1 for r in ids]
    )


def objective_rows(variant: str, tokenizer, requests: Sequence[EditRequest], device=None) -> TargetRows:
    builders = {"ft-m": masked_target_rows, "ft-l": prompt_last_rows}
    return builders[variant](tokenizer, requests, device=device)


# ------------------------------------------------------------------------------ what is trained
class TrainableDelta:
    """ΔW of one projection while it is trained: dense (out, in), or factors B (out, r) @ A (r, in)."""

    def __init__(self, projection: nn.Module, rank: int | None, generator: torch.Generator) -> None:
        in_features, out_features = in_out_features(projection)
        device = next(projection.parameters()).device
        self.dense = self.A = self.B = None
        if rank is None:
            self.dense = torch.zeros(out_features, in_features, device=device, requires_grad=True)
        else:
            # LoRA's initialisation: A uniform in ±1/√in (kaiming-uniform with a=√5), B zero, so ΔW
            # starts at zero and B receives gradient from the first step.
            bound = 1 / math.sqrt(in_features)
            A = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
            self.A = A.to(device).requires_grad_(True)
            self.B = torch.zeros(out_features, rank, device=device, requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.dense] if self.dense is not None else [self.A, self.B]

    def matrix(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.B @ self.A

    def added_output(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x for inputs x (..., in)."""
        if self.dense is not None:
            return x @ self.dense.T
        return (x @ self.A.T) @ self.B.T

    @torch.no_grad()
    def constrain(self, bound: float) -> None:
        """Keep every element of ΔW within ±bound: clamped when dense, B scaled down when factored
        (clamping the product elementwise would not stay low-rank)."""
        if self.dense is not None:
            self.dense.clamp_(-bound, bound)
            return
        largest = (self.B @ self.A).abs().max()
        if largest > bound:
            self.B.mul_(bound / largest)

    def payload(self) -> tuple[torch.Tensor, ...]:
        """What :meth:`DeltaLayer.append` takes: ``(D,)`` or ``(A, B)``."""
        return tuple(p.detach().clone() for p in self.parameters())


# ------------------------------------------------------------------------------------ training
def train_deltas(
    model: nn.Module,
    layout: Layout,
    sites: Mapping[str, tuple[int, nn.Module]],
    deltas: Mapping[str, TrainableDelta],
    rows: TargetRows,
    num_steps: int,
    lr: float,
    early_stop_loss: float,
    norm_constraint: float | None,
) -> TrainResult:
    """Train ``deltas`` (one per site, ``sites[name] = (block index, projection)``) on ``rows``' targets.

    The shared loop handles the lowest site (the blocks below it are replayed); the others add
    their ΔW x through forward hooks of their own, which run live in the blocks above.
    """
    order = sorted(sites, key=lambda name: sites[name][0])
    first, others = order[0], order[1:]

    def add_delta(delta: TrainableDelta):
        def hook(_module, args, output):
            return output + delta.added_output(args[0].float()).to(output.dtype)

        return hook

    def project() -> None:
        if norm_constraint is not None and math.isfinite(norm_constraint):
            for delta in deltas.values():
                delta.constrain(norm_constraint)

    handles = [sites[name][1].register_forward_hook(add_delta(deltas[name])) for name in others]
    try:
        layer, site = sites[first]
        return train_added_output(
            model,
            layout,
            layer,
            site,
            rows,
            [p for name in order for p in deltas[name].parameters()],
            added_output=deltas[first].added_output,
            extra_loss=lambda _x, added: added.new_zeros(()),
            steps=num_steps,
            lr=lr,
            early_stop_loss=early_stop_loss,
            after_step=project,
        )
    finally:
        for handle in handles:
            handle.remove()
