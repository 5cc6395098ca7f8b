"""Train a change to one module's output so the model emits edit targets (shared by WISE and T-Patcher).

WISE (a side copy of an MLP output projection) and T-Patcher (patch neurons beside it) both
change what one projection emits and learn the change by gradient descent: the model must
predict each request's new target after its prompt, also after short sampled prefixes, while a
method-specific term decides where the change acts. What they share lives here:

* :func:`build_target_rows`: the token rows of a set of requests (prompt + target, with and
  without prefixes) and which positions predict which target token;
* :func:`site_inputs`: the projection's inputs ("keys") at every token of some texts, the forward
  stopped right after the projection (GRACE uses them too, to keep its radii off edited prompts);
* :func:`train_added_output`: the optimisation loop. Blocks below the site are run once and
  replayed (:class:`~peft_edit.edit_site.EditSiteRunner`), the softmax runs over a shortlist of
  the vocabulary between full refreshes (:class:`~peft_edit.edit_site.TargetLogProbs`), and
  gradients reach only the method's own tensors.

A projection's input at block L does not depend on its own output (attention at L reads the
residual stream from before L's MLP), so keys collected once stay valid while the output is
trained.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import Layout
from ..capture import capture
from ..edit_site import AlignedBatch, EditSiteRunner, TargetLogProbs
from ..requests import EditRequest, fill, pad_token_id, tokenize_continuation

# Text about nothing in particular: the inputs an edit must leave alone when the user gives none.
# Questions and statements, since edit prompts come in both forms (ZsRE asks, CounterFact states).
UNRELATED_TEXTS: tuple[str, ...] = (
    "The weather today is sunny with a light breeze from the west.",
    "She opened the window and listened to the birds singing outside.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The committee will meet again next Tuesday to discuss the budget.",
    "He plays the piano every evening after dinner.",
    "The train to the airport leaves every fifteen minutes.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "Our team finished the project two weeks ahead of schedule.",
    "The museum is closed on Mondays and public holidays.",
    "Add the flour slowly and stir until the dough is smooth.",
    "The river flows north for about three hundred kilometres.",
    "Most cats sleep for more than twelve hours a day.",
    "The novel tells the story of a family across three generations.",
    "Prices rose sharply after the harvest failed last autumn.",
    "The children built a sandcastle near the edge of the water.",
    "What is the boiling point of water?",
    "How many legs does a spider have?",
    "Who wrote the novel about the white whale?",
    "Which planet is closest to the sun?",
    "What time does the library open on Saturdays?",
    "Where did you leave the keys to the car?",
    "What is the largest ocean on Earth?",
    "How do you say thank you in Spanish?",
    "Which language is spoken in Brazil?",
    "What does a carpenter do at work?",
    "Who painted the ceiling of the Sistine Chapel?",
    "The capital of Japan is Tokyo.",
    "Mount Everest is the highest mountain in the world.",
    "A week has seven days and a year has twelve months.",
    "The company was founded in a small garage in California.",
)


# ----------------------------------------------------------------------------------------- rows
@dataclass
class TargetRows:
    """Token rows (right-padded, no prefix cache) of requests, each after several prefixes.

    Row ``r`` belongs to request ``request_of[r]``; the first row of each request is the bare
    prompt (the prefix ``"{}"``). ``predicts[r]`` lists ``(position, target token)`` pairs: the
    logits at ``position`` must predict that token.
    """

    batch: AlignedBatch
    request_of: list[int]
    bare: list[bool]
    predicts: list[list[tuple[int, int]]]
    lengths: list[int]  # real tokens per row
    last_prompt: list[int]  # position of each row's last prompt token

    def valid_mask(self) -> torch.Tensor:
        """(rows, T) bool: the real tokens."""
        return self.batch.attention_mask.bool()

    def predicting_mask(self) -> torch.Tensor:
        """(rows, T) bool: the positions whose logits predict a target token."""
        mask = torch.zeros_like(self.batch.attention_mask, dtype=torch.bool)
        for r, pairs in enumerate(self.predicts):
            for pos, _ in pairs:
                mask[r, pos] = True
        return mask

    def predicting_mask_per_token(self) -> torch.Tensor:
        """(target tokens, rows, T) bool: where the j-th target token is predicted.

        For rows of one request (all rows then share its target tokens); their union over tokens
        is :meth:`predicting_mask`.
        """
        if len(set(self.request_of)) != 1:
            raise ValueError("Per-token masks need the rows of a single request.")
        masks = torch.zeros(len(self.predicts[0]), *self.batch.attention_mask.shape, dtype=torch.bool)
        for r, pairs in enumerate(self.predicts):
            for j, (pos, _token) in enumerate(pairs):
                masks[j, r, pos] = True
        return masks.to(self.batch.attention_mask.device)


def build_target_rows(
    tokenizer,
    requests: Sequence[EditRequest],
    context_templates: Sequence[str],
    device=None,
    replayed: Sequence[EditRequest] = (),
) -> TargetRows:
    """Rows of ``requests`` after every prefix, then of ``replayed`` (earlier edits kept in training) bare only."""
    ids, request_of, bare, predicts, last_prompt = [], [], [], [], []
    jobs = [(r, context_templates) for r in requests] + [(r, ["{}"]) for r in replayed]
    for i, (request, contexts) in enumerate(jobs):
        for context in contexts:
            template = context.replace("{}", request.template)
            prompt_ids, target_ids = tokenize_continuation(
                tokenizer, fill(template, request.subject), request.target_new
            )
            ids.append(prompt_ids + target_ids[:-1])
            request_of.append(i)
            bare.append(context == "{}")
            predicts.append([(len(prompt_ids) - 1 + j, tok) for j, tok in enumerate(target_ids)])
            last_prompt.append(len(prompt_ids) - 1)
    batch = AlignedBatch.build(ids, [0] * len(ids), pad_token_id(tokenizer), device=device)
    return TargetRows(batch, request_of, bare, predicts, [len(r) for r in ids], last_prompt)


# ---------------------------------------------------------------------------------------- keys
def site_inputs(model: nn.Module, site: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16):
    """The site's input at every real token of each text: a list of (tokens, in) float tensors."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    return token_site_inputs(model, site, rows, pad_token_id(tokenizer), batch_size)


def token_site_inputs(
    model: nn.Module, site: nn.Module, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16
):
    """:func:`site_inputs` of rows already tokenized."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        encoded = [list(r) for r in rows[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        input_ids = torch.tensor([e + [pad_id] * (width - len(e)) for e in encoded], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=device)
        seen, _ = capture(
            lambda input_ids=input_ids, mask=mask: model(
                input_ids=input_ids, attention_mask=mask, use_cache=False
            ),
            inputs={"site": site},
        )
        x = seen["site"].reshape(len(encoded), width, -1).float()
        out.extend(x[r, : len(e)] for r, e in enumerate(encoded))
    return out


# Per base model: keys of token rows seen before (unrelated texts, earlier edits' prompts), by layer.
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_site_inputs(model: nn.Module, layer: int, site: nn.Module, tokenizer, texts: Sequence[str]):
    """:func:`site_inputs`, remembering each text's keys per model and layer."""
    rows = [tuple(tokenizer(t)["input_ids"]) for t in texts]
    return cached_token_site_inputs(model, layer, site, rows, pad_token_id(tokenizer))


def cached_token_site_inputs(
    model: nn.Module, layer: int, site: nn.Module, rows: Sequence[Sequence[int]], pad_id: int
):
    """:func:`token_site_inputs`, remembering each row's keys per model and layer.

    Valid because the keys depend only on the weights below the site, which editing never changes.
    """
    cache = _KEYS.setdefault(model, {})
    rows = [tuple(r) for r in rows]
    missing = list(dict.fromkeys(r for r in rows if (layer, r) not in cache))
    if missing:
        for row, keys in zip(missing, token_site_inputs(model, site, missing, pad_id)):
            cache[(layer, row)] = keys
    return [cache[(layer, r)] for r in rows]


def remember_token_site_inputs(
    model: nn.Module, layer: int, rows: Sequence[Sequence[int]], keys: Sequence[torch.Tensor]
) -> None:
    """Give :func:`cached_token_site_inputs` keys computed elsewhere (an edit's own forward passes:
    :attr:`~peft_edit.edit_site.EditSiteRunner.token_site_inputs`), so that it need not run those rows."""
    cache = _KEYS.setdefault(model, {})
    for row, row_keys in zip(rows, keys, strict=True):
        cache.setdefault((layer, tuple(row)), row_keys)


# ------------------------------------------------------------------------------------ training
OPTIMIZERS = ("adam", "sgd")  # what train_added_output can step with


@dataclass
class TrainResult:
    nll: float  # mean negative log-likelihood of the targets at the end
    steps: int
    site_input: torch.Tensor  # (rows, T, in): the site's input in the training rows


def train_added_output(
    model: nn.Module,
    layout: Layout,
    layer: int,
    site: nn.Module,
    rows: TargetRows,
    parameters: Sequence[torch.Tensor],
    added_output: Callable[[torch.Tensor], torch.Tensor],
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    early_stop_loss: float,
    done: Callable[[], bool] = lambda: True,
    after_step: Callable[[], None] = lambda: None,
    optimizer: str = "adam",
    learnt_at_argmax: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Adam (or plain SGD: ``optimizer="sgd"``) on ``parameters`` so that ``site``'s output plus ``added_output(x)`` makes the model emit the targets.

    ``added_output(x)`` maps the site's input (rows, T, in) to what is added to its output
    (rows, T, out), at every position. The loss is the targets' mean NLL (over tokens, then rows)
    plus ``extra_loss(x, added)``. Optimisation stops after ``steps`` or once the targets are
    learnt and ``done()`` says the method's own constraints hold. Learnt means an NLL below
    ``early_stop_loss``, or, with ``learnt_at_argmax``, every target token its position's most
    likely one (what greedy decoding of the training rows would emit); either is confirmed on the
    full vocabulary at the model's precision, and optimisation goes on where it is not. ``after_step``
    runs after each update (e.g. to project the parameters back onto a constraint set).

    With ``compute_dtype`` the blocks from ``layer`` up run in that dtype at each step; the site's
    input, and so ``added_output`` and ``extra_loss``, stay at the model's precision (recorded once).
    """
    batch = rows.batch
    n_rows = batch.input_ids.shape[0]
    nll_rows, nll_cols, nll_tokens, nll_weights = [], [], [], []
    per_request = {}
    for owner in rows.request_of:
        per_request[owner] = per_request.get(owner, 0) + 1
    for r, pairs in enumerate(rows.predicts):
        for pos, tok in pairs:
            nll_rows.append(r)
            nll_cols.append(pos)
            nll_tokens.append(tok)
            # Every request weighs the same, and within it every row, and within a row every token.
            nll_weights.append(1.0 / (len(pairs) * per_request[rows.request_of[r]] * len(per_request)))
    device = batch.input_ids.device
    nll_tokens_t = torch.tensor(nll_tokens, device=device)
    nll_weights_t = torch.tensor(nll_weights, device=device)

    seen: dict[str, torch.Tensor] = {}

    def add_to_site(_module, _args, output):
        # The site's input does not depend on what is trained: the one recorded on entry, exact.
        x = seen["site_input"]
        added = added_output(x)
        seen["x"], seen["added"] = x, added
        return (output.reshape(n_rows, -1, output.shape[-1]) + added.to(output.dtype)).view_as(output)

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
    optimizer = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(parameters, lr=lr)
    was_training = model.training
    model.eval()
    nll_value, step = float("inf"), 0
    try:
        with EditSiteRunner(
            model, layout, layer, site, batch, keep_token_inputs=True, compute_dtype=compute_dtype
        ) as runner:
            seen["site_input"] = runner.row_site_inputs[:, batch.split :]
            handle = site.register_forward_hook(add_to_site)
            try:
                zero = torch.zeros(runner.site_output.shape[-1], device=device)
                targets = TargetLogProbs(model, nll_rows, nll_cols, nll_tokens_t, refresh_dtype=compute_dtype)

                def learnt() -> bool:
                    return nll_value < early_stop_loss or (learnt_at_argmax and targets.on_top)

                def on_full_vocabulary(hidden: torch.Tensor) -> float:
                    """The targets' NLL over the whole vocabulary (and ``targets.on_top`` with it)."""
                    return -(targets.full(hidden) * nll_weights_t).sum().item()

                for step in range(1, steps + 1):
                    optimizer.zero_grad()
                    hidden = runner.final_hidden(zero)
                    nll = -(targets(hidden) * nll_weights_t).sum()
                    loss = nll + extra_loss(seen["x"], seen["added"])
                    nll_value = nll.item()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"The edit's training loss became {loss.item()} at step {step}; lower the learning rate."
                        )
                    # A shortlist's NLL is a lower bound and its argmax a candidate, and a lowered
                    # step's an approximation: a stop is confirmed, and the last loss reported, on
                    # the whole vocabulary, then (the costlier check, so only if that holds) at the
                    # model's precision.
                    if step == steps or learnt() and done():
                        if not targets.exact:
                            nll_value = on_full_vocabulary(hidden)
                        if runner.lowered and (step == steps or learnt()):
                            with torch.no_grad(), runner.full_precision():
                                nll_value = on_full_vocabulary(runner.final_hidden(zero))
                        if step == steps or learnt():
                            break  # the last loss is measured, not followed by another update
                    loss.backward()
                    optimizer.step()
                    after_step()
            finally:
                handle.remove()
    finally:
        model.train(was_training)
    return TrainResult(nll=nll_value, steps=step, site_input=seen["x"].detach())
