"""Batched probes behind the three families of numbers the field reports, and the per-probe scores.

* **teacher-forced**: the prompt followed by the answer's tokens; at each answer position, is
  the model's argmax the answer token (EasyEdit's "rewrite/rephrase acc"), and which token is it
  (locality compares these before and after the edit);
* **probability**: the mean log-probability of the answer's tokens, compared between the new and
  the true answer (ROME/MEMIT's efficacy, paraphrase and neighborhood scores);
* **generation**: greedy decoding from the prompt; does the text start with the answer, or is it
  unchanged by the edit (the "wild" protocol).

The model-facing functions (:func:`teacher_forced`, :func:`greedy_continuations`) batch many
probes per forward pass, sorted by length so little is spent on padding; :func:`answer_scores`
is the pure part (logits in, scores out) and is what the hand-made-logits tests check.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..requests import generation_prompt, pad_token_id, tokenize_continuation


@dataclass
class TeacherForced:
    """One (prompt, answer) pair scored with the answer given."""

    answer_ids: list[int]
    logprobs: list[float]  # log P(answer token | prompt, earlier answer tokens)
    argmax_ids: list[int]  # the model's top token at each of those positions

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def total_logprob(self) -> float:
        return sum(self.logprobs)

    @property
    def token_accuracy(self) -> float:
        return sum(a == t for a, t in zip(self.argmax_ids, self.answer_ids)) / len(self.answer_ids)


def answer_scores(
    logits: torch.Tensor,
    starts: Sequence[int],
    prompt_lengths: Sequence[int],
    answers: Sequence[Sequence[int]],
    rows: Sequence[int] | None = None,
) -> list[TeacherForced]:
    """Score each answer's tokens from the logits of a padded batch.

    Answer ``i`` is read from logits row ``rows[i]`` (default ``i``: one answer per row), which holds
    its prompt at positions ``starts[i] .. starts[i] + prompt_lengths[i] - 1`` and the answer right
    after (``starts[i]`` is 0 with right padding, the pad count with left padding; negative when
    ``logits`` cover only the last positions of the batch, as they are counted from the first
    covered one). The logits at the position before each answer token predict it.
    """
    results = []
    for i, (start, p_len, answer) in enumerate(zip(starts, prompt_lengths, answers)):
        first = start + p_len - 1
        row = i if rows is None else rows[i]
        # Only this answer's positions are normalised: no vocabulary-wide copy of the batch.
        positions = logits[row, first : first + len(answer)].float()
        ids = torch.tensor(list(answer), device=positions.device, dtype=torch.long)
        logprobs = positions.gather(-1, ids[:, None])[:, 0] - positions.logsumexp(-1)
        results.append(
            TeacherForced(
                answer_ids=list(answer), logprobs=logprobs.tolist(), argmax_ids=positions.argmax(-1).tolist()
            )
        )
    return results


# At most this many (row, position) pairs of logits per forward pass: the logits of a batch of
# long answers (PIQA's solutions) would otherwise take gigabytes with a large vocabulary.
LOGIT_POSITIONS_PER_BATCH = 2048


def _length_batches(
    lengths: Sequence[int], logit_positions: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early).

    A batch holds at most ``batch_size`` rows, and fewer when its rows need many logit positions
    (a batch's logits cover ``rows x max(logit_positions)``), but always at least one row.
    """
    batches: list[list[int]] = []
    widest = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        wider = max(widest, logit_positions[i])
        if (
            batches
            and len(batches[-1]) < batch_size
            and (len(batches[-1]) + 1) * wider <= LOGIT_POSITIONS_PER_BATCH
        ):
            batches[-1].append(i)
            widest = wider
        else:
            batches.append([i])
            widest = logit_positions[i]
    return batches


def _accepts(model, argument: str) -> bool:
    """Whether the (base) model's forward takes ``argument`` (a peft wrapper passes it through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


@torch.no_grad()
def teacher_forced(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    padding_side: str = "left",
) -> list[TeacherForced]:
    """Score every answer after its prompt, ``batch_size`` model rows per forward pass.

    A pair's model row is its prompt followed by its answer but for the answer's last token (whose
    own logits predict nothing scored), and pairs with the same row share it: a prompt scored
    against several one-token answers (CounterFact's new and true targets, a neighbour's answer
    and the new target) runs once, which halves the tokens a CounterFact case costs.
    Rows are batched by length. With left padding (the default) every row ends at the last
    position, so its answers sit in the last few positions: the model is asked for logits there
    only (``logits_to_keep``), which spares the LM head and the vocabulary-wide softmax over the
    prompts (PIQA's long goals), and position ids restart at 0 after each row's padding.
    ``padding_side="right"`` computes logits everywhere and needs nothing of the model.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    encoded = [tokenize_continuation(tokenizer, p, a) for p, a in zip(prompts, answers)]
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    left = padding_side == "left"
    keep_tail = left and _accepts(model, "logits_to_keep")
    pairs_by_row: dict[tuple[int, ...], list[int]] = {}
    for i, (p, a) in enumerate(encoded):
        pairs_by_row.setdefault(tuple(p + a[:-1]), []).append(i)
    rows, pairs_of_row = [list(r) for r in pairs_by_row], list(pairs_by_row.values())
    # A row's answers end at its last position; the longest of them sets how many logits it needs.
    answer_span = [max((len(encoded[i][1]) for i in pairs), default=0) for pairs in pairs_of_row]
    lengths = [len(r) for r in rows]
    logit_positions = answer_span if keep_tail else lengths
    results: list[TeacherForced | None] = [None] * len(encoded)
    for batch in _length_batches(lengths, logit_positions, batch_size):
        width = max(lengths[r] for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        starts = [width - lengths[r] if left else 0 for r in batch]
        for j, (r, s) in enumerate(zip(batch, starts)):
            ids[j, s : s + lengths[r]] = torch.tensor(rows[r])
            mask[j, s : s + lengths[r]] = 1
        kwargs = {}
        if left:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        first_kept = 0
        if keep_tail:
            kept = max(1, max(answer_span[r] for r in batch))
            kwargs["logits_to_keep"] = kept
            first_kept = width - kept
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        pairs = [(j, i) for j, r in enumerate(batch) for i in pairs_of_row[r]]
        scored = answer_scores(
            logits,
            [starts[j] - first_kept for j, _ in pairs],
            [len(encoded[i][0]) for _, i in pairs],
            [encoded[i][1] for _, i in pairs],
            rows=[j for j, _ in pairs],
        )
        for (_, i), s in zip(pairs, scored):
            results[i] = s
    return results  # type: ignore[return-value]


# A row may decode up to this many tokens beyond its own need, or half its need if that is more,
# while it waits for the longest row of its batch. Exact-length batches would leave sentence-long
# answers (10-50 tokens, nearly all different) in batches of one or two; the decoding steps of a
# small model cost about the same for one row as for thirty-two.
GENERATION_SLACK_TOKENS = 8


def _generation_batches(
    new_tokens: Sequence[int], prompt_lengths: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Indices in batches of at most ``batch_size`` whose token needs differ by little (see above)."""
    order = sorted(range(len(new_tokens)), key=lambda i: (new_tokens[i], prompt_lengths[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size:
            shortest = new_tokens[batches[-1][0]]
            if new_tokens[i] - shortest <= max(GENERATION_SLACK_TOKENS, shortest // 2):
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


@torch.no_grad()
def greedy_continuations(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int | Sequence[int], batch_size: int = 32
) -> list[str]:
    """Greedy text after each prompt (left padding, so every row continues from its last token).

    A prompt's trailing spaces are left out (:func:`~peft_edit.requests.generation_prompt`), as
    teacher-forced scoring and every edit leave them to the answer's first token; the text then
    begins with that space.

    A batch decodes as many tokens as its longest request and each row keeps its own number, so
    batches hold requests of similar length (:func:`_generation_batches`).
    """
    lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    encoded = [tokenizer(generation_prompt(p))["input_ids"] for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    for batch in _generation_batches(lengths, [len(e) for e in encoded], batch_size):
        chunk = [encoded[i] for i in batch]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(lengths[i] for i in batch),
            do_sample=False,
            pad_token_id=pad,
        )
        for i, row in zip(batch, out[:, width:]):
            outputs[i] = tokenizer.decode(row[: lengths[i]], skip_special_tokens=True)
    return outputs


# ------------------------------------------------------------------------- per-probe scores


def starts_with_answer(text: str, answer: str) -> bool:
    """Generation exact match: the output, stripped, begins with the answer (case-sensitive)."""
    return text.strip().startswith(answer.strip())


def prefers(first: TeacherForced, second: TeacherForced) -> bool:
    """ROME/MEMIT's probability comparison: ``first``'s answer has the higher mean token log-probability.

    Efficacy and paraphrase scores ask ``prefers(new, true)``; neighborhood asks
    ``prefers(true, new)`` on the neighbours. The mean (not the sum) keeps answers of different
    token counts comparable, as in ROME.
    """
    return first.mean_logprob > second.mean_logprob


def unchanged_fraction(before: Sequence[int], after: Sequence[int]) -> float:
    """Teacher-forced locality: the share of answer positions whose argmax token did not move."""
    if len(before) != len(after) or not before:
        raise ValueError(
            f"Compare argmax tokens of the same probe: got {len(before)} and {len(after)} positions."
        )
    return sum(a == b for a, b in zip(before, after)) / len(before)
