"""WISE's maths: activation gaps, the routing margins, shard masks, Ties merging.

Notation of the paper: the side memory is ``W' = W + D``; the activation gap of an input ``x`` is
``Δ(x) = ||(W' − W) x|| = ||D x||`` (per token), and a text's gap is its mean over the text's
tokens (here: over the tokens up to each position, so the rule is causal and a KV-cached
generation routes exactly as a full forward pass).
"""

from __future__ import annotations

import torch


def shard_mask(
    out_features: int, in_features: int, ratio: float, seed: int, shard: int, device=None
) -> torch.Tensor:
    """The random subspace of one shard: a (out, in) 0/1 float mask with a fraction ``ratio`` of ones.

    Drawn from ``(seed, shard)`` alone, so it is never stored and every shard gets its own.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    mask = torch.rand(out_features, in_features, generator=generator) < ratio
    return mask.float().to(device)


def token_gaps(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||D x||`` per token: x (..., in), delta (out, in) -> (...), the norm taken in float32 whatever
    the dtype of the product."""
    return (x @ delta.T).float().norm(dim=-1)


def running_mean_gaps(gaps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean gap over the real tokens up to each position: gaps, valid (rows, T) -> (rows, T)."""
    valid = valid.to(gaps.dtype)
    return (gaps * valid).cumsum(-1) / valid.cumsum(-1).clamp(min=1)


def segment_running_means(gaps: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """:func:`running_mean_gaps` of texts laid end to end: gaps (sum(lengths),) -> the same shape."""
    if not lengths:
        return gaps
    lengths_t = torch.tensor(lengths, device=gaps.device)
    text = torch.repeat_interleave(torch.arange(len(lengths), device=gaps.device), lengths_t)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    total = gaps.cumsum(0)
    before = torch.cat([total.new_zeros(1), total])[starts]  # the sum up to each text's start
    position = torch.arange(gaps.shape[0], device=gaps.device) - starts[text] + 1
    return (total - before[text]) / position


def memory_threshold(prompt_keys: list[torch.Tensor], delta: torch.Tensor, act_ratio: float) -> torch.Tensor:
    """A memory's routing threshold: ``act_ratio`` times the smallest mean gap over its edits' prompts."""
    return act_ratio * torch.stack([token_gaps(k, delta).mean() for k in prompt_keys]).min()


def texts_routed(unrelated_gaps: torch.Tensor, lengths: list[int], threshold: float) -> int:
    """How many texts the router would send to the memory at one token or more: their running-mean gap
    above ``threshold`` somewhere. ``unrelated_gaps`` are the texts' token gaps laid end to end."""
    above = segment_running_means(unrelated_gaps, lengths) > threshold
    return sum(bool(text.any()) for text in above.split(lengths))


def routes_apart(unrelated_gaps: torch.Tensor, lengths: list[int], threshold: float) -> bool:
    """Whether the router would leave every unrelated text alone (:func:`texts_routed` is 0)."""
    return texts_routed(unrelated_gaps, lengths, threshold) == 0


def shared_prefix_lengths(texts, rows) -> list[int]:
    """For each token sequence in ``texts``, how many leading tokens it shares with one of ``rows``.

    A causal model gives those tokens exactly the keys it gives the row's own tokens, so no memory can
    tell them apart: they are neither the edit's nor unrelated text.
    """
    lengths = []
    for text in texts:
        longest = 0
        for row in rows:
            shared = 0
            for a, b in zip(text, row):
                if a != b:
                    break
                shared += 1
            longest = max(longest, shared)
        lengths.append(longest)
    return lengths


def margin_loss(
    edit_gaps: torch.Tensor,
    unrelated_gaps: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    unrelated_weight: float = 1.0,
) -> tuple[torch.Tensor, bool]:
    """The paper's routing loss: unrelated gaps below α, edit gaps above β, and apart by at least γ.

    Also returns whether the margins hold: edit gaps above β, apart by γ, and the unrelated gaps
    below α on average (a few unrelated tokens above α are tolerated; requiring all of them would
    only grow the memory). ``unrelated_weight`` weighs the first term: with unit weight the
    target's likelihood wins, and the side memory learns a change that fires on every text.
    """
    zero = edit_gaps.new_zeros(())
    low = torch.relu(unrelated_gaps - alpha).mean() if unrelated_gaps.numel() else zero
    quiet = unrelated_gaps.mean() if unrelated_gaps.numel() else zero
    high = torch.relu(beta - edit_gaps).mean()
    apart = torch.relu(gamma - (edit_gaps.mean() - quiet))
    holds = high.item() == 0 and apart.item() == 0 and quiet.item() <= alpha
    return unrelated_weight * low + high + apart, holds


def ties_merge(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Ties merging (Yadav et al., 2023) of task vectors ``deltas`` (k, out, in) into one (out, in).

    Trim each to its ``density`` fraction of largest magnitudes, elect a sign per entry (the sign
    of the trimmed sum), and average only the values that agree with it.
    """
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    keep = max(1, int(round(density * flat.shape[1])))
    if keep < flat.shape[1]:
        threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
        flat = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(flat.sum(0))
    agree = (torch.sign(flat) == sign) & (flat != 0)
    total = (flat * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return (total / count).reshape(deltas.shape[1:])
