"""Run a batch of prompts many times with a vector added at one "edit site", recomputing only what it reaches.

ROME-style methods optimise a vector δ added to a module's output (the MLP output projection of
block L) at one position of each prompt (the subject's last token). Most of each forward pass
does not depend on δ:

* positions before the site: causal attention keeps them independent of it, so they are run once
  and kept as a key/value cache;
* blocks below L at the site and after it: δ enters at block L, so their outputs are computed once
  and replayed;
* the site itself: its input comes from before δ enters (attention at L reads the residual stream
  from before L's MLP), so its output, which may hold other edits (a codebook, patch neurons), is
  computed once too and replayed, δ added by hooks on top.

Rows are aligned so that the site sits in the same column ``split`` of every row (left padding),
which lets one cache serve the whole batch. Each optimisation step then runs blocks L.. on the
columns from ``split`` on, and the LM head only where a loss needs logits; rows whose optimisation
has finished can be dropped from later steps (:meth:`EditSiteRunner.keep_rows`).

The blocks a step runs may run in a lower precision than the model's (``compute_dtype``): their
matrix products are nearly all of a step's arithmetic, and bfloat16 runs them about twice as fast
on CPUs with bfloat16 instructions and on GPUs. Whatever the step computes then is an
approximation; :meth:`EditSiteRunner.full_precision` switches back for the passes a result is
judged by.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .architectures import Layout, backbone, get_blocks, lm_head, logits_from_hidden
from .capture import StopForward, run_stoppable


@dataclass
class AlignedBatch:
    """Token rows left-padded so each row's site is at column ``split``."""

    input_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor  # (rows, T)
    position_ids: torch.Tensor  # (rows, T)
    split: int
    pad_left: list[int]

    @classmethod
    def build(
        cls, rows: Sequence[Sequence[int]], sites: Sequence[int], pad_id: int, device=None
    ) -> AlignedBatch:
        split = max(sites)
        pad_left = [split - s for s in sites]
        width = max(p + len(r) for p, r in zip(pad_left, rows))
        ids, mask = [], []
        for p, r in zip(pad_left, rows):
            right = width - p - len(r)
            ids.append([pad_id] * p + list(r) + [pad_id] * right)
            mask.append([0] * p + [1] * len(r) + [0] * right)
        input_ids = torch.tensor(ids, device=device)
        attention_mask = torch.tensor(mask, device=device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(input_ids, attention_mask, position_ids, split, pad_left)

    def suffix_column(self, row: int, token_index: int) -> int:
        """Column, counted from ``split``, of token ``token_index`` of ``row`` (unpadded numbering)."""
        return self.pad_left[row] + token_index - self.split


class EditSiteRunner:
    """Use as a context manager; inside, :meth:`final_hidden` runs the batch with δ at the site.

    Args:
        model: a causal LM (possibly with edit layers injected).
        layout: its :class:`~peft_edit.architectures.Layout`.
        layer: index of the block that holds the site.
        site: the module (inside block ``layer``) whose output receives δ at column ``split``.
        keep_token_inputs: also keep the site's input at every token of each row
            (:attr:`token_site_inputs`, :attr:`row_site_inputs`); off, only column ``split``'s is kept.
        compute_dtype: the dtype blocks ``layer`` and above run in at each step (None: the model's);
            the keys, the site's output and the prefix are computed at the model's precision.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: Layout,
        layer: int,
        site: nn.Module,
        batch: AlignedBatch,
        keep_token_inputs: bool = False,
        compute_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.layout = layout
        self.body = backbone(model, layout)
        self.blocks = get_blocks(model, layout)
        self.layer = layer
        self.site = site
        self.batch = batch
        self.keep_token_inputs = keep_token_inputs
        self.site_input: torch.Tensor | None = None  # (rows, in): the site's input at column split
        self.site_output: torch.Tensor | None = None  # (rows, out): its output there, before δ
        # With keep_token_inputs, per row, the site's input at each of its tokens (padding left out), as set
        # up on entry: δ never reaches it, so a caller that needs these keys (GRACE's bystanders) need not
        # run the rows again. Off by default: other callers would copy every row's inputs for nothing.
        self.token_site_inputs: list[torch.Tensor] | None = None
        # With keep_token_inputs, the site's input at every column of the current rows (keep_rows narrows
        # it), (rows, columns, in) with padding: what a caller that adds to the site's output at every
        # column reads, at the model's precision even while steps run in a lower one.
        self.row_site_inputs: torch.Tensor | None = None
        self._replayed: list[tuple[nn.Module, object]] = []  # with any instance-level forward it had
        self.compute_dtype = compute_dtype
        self._lowered: LoweredBlocks | None = None
        # transformers renamed `past_key_values` to `cache` during 5.x; use whichever this model takes.
        self._cache_kwarg = (
            "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"
        )

    # ---------------------------------------------------------------- setup
    def __enter__(self) -> EditSiteRunner:
        b = self.batch
        # Gradients flow to δ only; weight gradients would double the cost of every backward pass.
        self._grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._grad_flags:
            p.requires_grad_(False)
        with torch.no_grad():
            self.row_site_inputs = self._record()
            if self.keep_token_inputs:
                self.token_site_inputs = [
                    x[mask.bool()] for x, mask in zip(self.row_site_inputs, b.attention_mask)
                ]
        # The replays read the recordings at call time, so that keep_rows can narrow them.
        for i in range(self.layer):
            self._replay(self.blocks[i], lambda i=i: self._lower_outputs[i])
        for name in self._before_site:
            self._replay(self.blocks[self.layer].get_submodule(name), lambda name=name: self._replayed_part(name))
        # A copy per call: the caller's model may add to the site's output in place.
        self._replay(self.site, lambda: self._site_full_output.clone())
        if self.compute_dtype is not None and self.compute_dtype != self._site_full_output.dtype:
            try:
                final_norm = self.model.get_submodule(self.layout.final_norm) if self.layout.final_norm else None
                self._lowered = LoweredBlocks(
                    self.blocks, self.layer, self.compute_dtype, self.prefix_cache, skip=self.site, after=final_norm
                )
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    @property
    def lowered(self) -> bool:
        """Whether steps run in ``compute_dtype`` rather than the model's own dtype."""
        return self._lowered is not None

    @contextmanager
    def full_precision(self):
        """Inside, steps run every block at the model's own precision (a no-op without ``compute_dtype``)."""
        if self._lowered is None or not self._lowered.active:
            yield
            return
        self._lowered.switch(False)
        try:
            yield
        finally:
            self._lowered.switch(True)

    def _replayed_part(self, name: str):
        """What part ``name`` of the site's block gave on entry, in the dtype the block runs in now; a
        copy, as the block may add to it in place."""
        recorded = self._before_site[name]
        if self._lowered is not None and self._lowered.active:
            return _cloned(_to_dtype(recorded, self._lowered.dtype))
        return _cloned(recorded)

    def _replay(self, module: nn.Module, recorded) -> None:
        # An instance-level forward (e.g. a dispatch hook's wrapper) is put back on exit.
        self._replayed.append((module, vars(module).get("forward")))
        module.forward = lambda *args, **kwargs: recorded()

    @property
    def can_drop_rows(self) -> bool:
        """Whether :meth:`keep_rows` works with this model's cache."""
        return self.prefix_cache is None or hasattr(self.prefix_cache, "batch_select_indices")

    def keep_rows(self, rows: Sequence[int]) -> None:
        """From now on run only ``rows`` (indices into the current rows, in order); later calls see them
        renumbered 0, 1, ... A caller whose rows no longer need optimising drops them so that each step
        computes only the rest."""
        n_rows = self.batch.input_ids.shape[0]
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.batch.input_ids.device)
        b = self.batch
        self.batch = AlignedBatch(
            b.input_ids[index],
            b.attention_mask[index],
            b.position_ids[index],
            b.split,
            [b.pad_left[i] for i in rows],
        )
        if self.prefix_cache is not None:
            self.prefix_cache.batch_select_indices(index)
        if self._lowered is not None and self._lowered.cache is not None:
            self._lowered.cache.batch_select_indices(index)
        self._lower_outputs = {i: _select_rows(out, index, n_rows) for i, out in self._lower_outputs.items()}
        self._before_site = {name: _select_rows(out, index, n_rows) for name, out in self._before_site.items()}
        self._site_full_output = _select_rows(self._site_full_output, index, n_rows)
        self.site_input, self.site_output = self.site_input[index], self.site_output[index]
        if self.row_site_inputs is not None:
            self.row_site_inputs = self.row_site_inputs[index]

    def __exit__(self, *exc) -> None:
        if self._lowered is not None:
            self._lowered.restore()
            self._lowered = None
        for module, own_forward in self._replayed:
            if own_forward is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own_forward
        self._replayed = []
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)

    def _record(self) -> torch.Tensor | None:
        """Run the whole rows once, keeping what the steps need: the prefix's key/value cache and, for
        the columns from ``split`` on, the outputs the replays give back. With keep_token_inputs,
        returns the site's input at every column (rows, columns, in).

        One pass over the whole rows rather than the prefix and then the suffix: on a CPU the
        suffix's few rows use the matrix units poorly (SmolLM2 in float32: 37 rows at about half the
        throughput of 150). Besides the blocks below the site's, the parts of the site's own block
        that finish before the site runs (:meth:`_parts_beside_site`: the attention and norms of a
        block whose MLP is the site, and the MLP's input projections where the site is its output
        projection) are kept: nothing δ changes reaches them, so a step need not compute them again
        (on SmolLM2 a sixth of a GRACE step's forward pass).
        """
        b = self.batch
        n_rows, n_columns = b.input_ids.shape
        keep_cache = b.split > 0

        def suffix_of(output):
            return _cloned(_columns_from(output, b.split, n_rows, n_columns))

        self._lower_outputs: dict[int, object] = {}
        self._before_site: dict[str, object] = {}
        calls: dict[str, int] = {}
        seen = {}

        def keep_block_output(i):
            def hook(_module, _args, output):
                self._lower_outputs[i] = suffix_of(output)

            return hook

        def keep_before_site(name):
            def hook(_module, _args, output):
                calls[name] = calls.get(name, 0) + 1
                if "site_started" not in seen:
                    self._before_site[name] = suffix_of(output)

            return hook

        def site_starts(_module, _args):
            seen["site_started"] = True

        def keep_site(_module, args, output):
            # Copies: some blocks add to the site's output in place (Falcon adds attention to it).
            self._site_full_output = suffix_of(output.detach())
            inputs = self._by_row(args[0]).detach()
            self.site_input = inputs[:, b.split].float().clone()
            if self.keep_token_inputs:
                seen["inputs"] = inputs.float().clone()
            self.site_output = self._by_row(output)[:, b.split].detach().float().clone()

        def end_of_sites_block(_module, _args, _output):
            # Without a prefix nothing above is needed; the block itself runs to its end, so that a
            # part called again after the site (Phi's dropout serves attention and MLP) is seen.
            if not keep_cache:
                raise StopForward

        handles = []
        try:
            for i in range(self.layer):
                handles.append(self.blocks[i].register_forward_hook(keep_block_output(i)))
            for name, part in self._parts_beside_site():
                handles.append(part.register_forward_hook(keep_before_site(name)))
            handles.append(self.site.register_forward_pre_hook(site_starts))
            handles.append(self.site.register_forward_hook(keep_site))
            handles.append(self.blocks[self.layer].register_forward_hook(end_of_sites_block))
            out = run_stoppable(
                lambda: self.body(
                    input_ids=b.input_ids,
                    attention_mask=b.attention_mask,
                    position_ids=b.position_ids,
                    use_cache=keep_cache,
                )
            )
        finally:
            for h in handles:
                h.remove()
        # One recording stands for one call: a part run twice, or again after the site, keeps running.
        self._before_site = {name: out for name, out in self._before_site.items() if calls[name] == 1}
        self.prefix_cache = None
        if keep_cache:
            self.prefix_cache = _cut_to_prefix(getattr(out, self._cache_kwarg), b.split)
            if self.prefix_cache is None:  # layers that cannot be cut (sliding windows): run the prefix alone
                self.prefix_cache = getattr(
                    self.body(
                        input_ids=b.input_ids[:, : b.split],
                        attention_mask=b.attention_mask[:, : b.split],
                        position_ids=b.position_ids[:, : b.split],
                        use_cache=True,
                    ),
                    self._cache_kwarg,
                )
        return seen.get("inputs")

    def _parts_beside_site(self) -> list[tuple[str, nn.Module]]:
        """(name within the block, module) of every part of the site's block that does not hold the
        site: the other children of each module on the way from the block down to the site. Which of
        them finish before the site runs is seen when the rows run."""
        parts, holder, path = [], self.blocks[self.layer], ""
        while holder is not self.site:
            inner = None
            for name, child in holder.named_children():
                if any(m is self.site for m in child.modules()):
                    inner = (name, child)
                else:
                    parts.append((path + name, child))
            if inner is None:
                raise ValueError(f"the edit site is not inside block {self.layer}")
            path, holder = path + inner[0] + ".", inner[1]
        return parts

    def _by_row(self, tensor: torch.Tensor) -> torch.Tensor:
        """(rows, columns, features), also for models (OPT) whose MLP sees rows and columns flattened."""
        return tensor.view(self.batch.input_ids.shape[0], -1, tensor.shape[-1])

    # ----------------------------------------------------------------- steps
    def _run_suffix(self) -> torch.Tensor:
        b = self.batch
        prefix = self.prefix_cache
        if self._lowered is not None and self._lowered.active:
            prefix = self._lowered.cache
        cache = _extendable_copy(prefix) if prefix is not None else None
        out = self.body(
            input_ids=b.input_ids[:, b.split :],
            attention_mask=b.attention_mask,
            position_ids=b.position_ids[:, b.split :],
            use_cache=cache is not None,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state

    def final_hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Last hidden states (rows, T - split, hidden) with ``delta`` added to the site's output at column split.

        ``delta`` is one vector for every row, or one row of it per batch row.
        """
        per_row = delta[:, None, :] if delta.dim() == 2 else delta

        def add_delta(_module, _args, output):
            by_row = self._by_row(output)
            at_site = torch.zeros(by_row.shape[1], 1, dtype=output.dtype, device=output.device)
            at_site[0] = 1
            return (by_row + at_site * per_row.to(output.dtype)).view_as(output)

        handle = self.site.register_forward_hook(add_delta)
        try:
            hidden = self._run_suffix()
        finally:
            handle.remove()
        return hidden if self._lowered is None else hidden.to(self._lowered.full_dtype)

    def log_probs(self, hidden: torch.Tensor, rows: Sequence[int], columns: Sequence[int]) -> torch.Tensor:
        """Log-softmax over the vocabulary at the given (row, suffix column) pairs only."""
        picked = hidden[torch.as_tensor(rows), torch.as_tensor(columns)]
        return torch.log_softmax(logits_from_hidden(self.model, picked).float(), dim=-1)


class LoweredBlocks:
    """Blocks ``first`` and above of a model, switched to ``dtype`` until :meth:`restore`.

    Each parameter's data is swapped for a converted copy (both are kept, so switching back and forth
    copies nothing and the model's own weights come back untouched), and what reaches each block (the
    hidden states, rotary tables, masks) is converted on the way in; ``after`` (the final norm) gets
    its input back in the model's dtype. The prefix cache's layers from ``first`` on are converted
    once into :attr:`cache`, for suffix runs while switched. The parameters of ``skip`` (a module
    whose output is replayed) are left as they are.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        first: int,
        dtype: torch.dtype,
        prefix_cache,
        skip: nn.Module | None = None,
        after: nn.Module | None = None,
    ) -> None:
        upper = list(blocks)[first:]
        skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
        params = [p for b in upper for p in b.parameters() if p.is_floating_point() and id(p) not in skipped]
        self.dtype = dtype
        self.full_dtype = params[0].dtype if params else dtype
        self._params = [(p, p.data, p.data.to(dtype)) for p in params]
        self.cache = _converted_cache(prefix_cache, first, dtype) if prefix_cache is not None else None
        self._hooks = [b.register_forward_pre_hook(self._convert_inputs, with_kwargs=True) for b in upper]
        if after is not None:
            self._hooks.append(after.register_forward_pre_hook(self._restore_inputs, with_kwargs=True))
        self.active = False
        self.switch(True)

    def switch(self, low: bool) -> None:
        for p, full, lowered in self._params:
            p.data = lowered if low else full
        self.active = low

    def restore(self) -> None:
        self.switch(False)
        for hook in self._hooks:
            hook.remove()
        self._params = []

    def _convert_inputs(self, _module, args, kwargs):
        if not self.active:
            return None
        return _to_dtype(args, self.dtype), _to_dtype(kwargs, self.dtype)

    def _restore_inputs(self, _module, args, kwargs):
        if not self.active:
            return None
        return _to_dtype(args, self.full_dtype), _to_dtype(kwargs, self.full_dtype)


def _to_dtype(value, dtype: torch.dtype):
    """``value`` with every floating-point tensor in it (through tuples, lists, dicts) converted."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_dtype(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to_dtype(v, dtype) for k, v in value.items()}
    return value


def _converted_cache(cache, first: int, dtype: torch.dtype):
    """A copy of ``cache`` whose layers ``first`` and above hold their keys and values in ``dtype``
    (every layer a copy, so row selection on one cache never touches the other's layers)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"a reduced compute_dtype needs a cache with per-layer keys, not {type(cache).__name__}")
    converted = copy.copy(cache)
    converted.layers = []
    for i, layer in enumerate(layers):
        layer = copy.copy(layer)
        if i >= first and getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
        converted.layers.append(layer)
    return converted


# Cache layers whose update binds new tensors (torch.cat) and never writes into the stored ones.
_REBINDING_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def _extendable_copy(cache):
    """A copy of the prefix cache that one suffix run may extend, leaving ``cache`` as it was.

    Every step of an optimisation runs the suffix on the same prefix. Deep-copying every layer's
    keys and values (SmolLM2: 30 layers of a 150-token passage) took 5 ms of a 60 ms GRACE step
    timed alone, and sequential GRACE edits took a median 18 % longer with it than without. Where
    each layer rebinds its tensors on update, copying the layer objects suffices and the tensors are
    shared. Any other cache (static layers write in place) is deep-copied.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) not in _REBINDING_LAYERS for layer in layers):
        return copy.deepcopy(cache)
    shallow = copy.copy(cache)
    shallow.layers = [copy.copy(layer) for layer in layers]
    return shallow


def _cut_to_prefix(cache, length: int):
    """``cache`` holding only its first ``length`` positions, or None where its layers are not plain
    dynamic ones (a sliding window's layer keeps state that slicing would not undo)."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    for layer in layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
    return cache


def _columns_from(recorded, first: int, n_rows: int, n_columns: int):
    """``recorded`` (a module's output over whole rows: a tensor or a tuple of them) from column ``first`` on.

    Tensors lead with rows and columns, or with the two flattened (OPT's MLP); anything else is kept.
    """
    if isinstance(recorded, (tuple, list)):
        return type(recorded)(_columns_from(part, first, n_rows, n_columns) for part in recorded)
    if first == 0 or not isinstance(recorded, torch.Tensor) or recorded.dim() < 2:
        return recorded
    if tuple(recorded.shape[:2]) == (n_rows, n_columns):
        return recorded[:, first:]
    if recorded.shape[0] == n_rows * n_columns:
        by_row = recorded.view(n_rows, n_columns, *recorded.shape[1:])
        return by_row[:, first:].reshape(-1, *recorded.shape[1:])
    return recorded


def _cloned(recorded):
    """``recorded`` (a tensor, or a tuple or list of them and other values) with every tensor copied."""
    if isinstance(recorded, (tuple, list)):
        return type(recorded)(_cloned(part) for part in recorded)
    return recorded.clone() if isinstance(recorded, torch.Tensor) else recorded


def _select_rows(recorded, index: torch.Tensor, n_rows: int):
    """``recorded`` (a module's output: a tensor or a tuple of them) restricted to the rows ``index``.

    Tensors lead with the rows, or with rows x columns flattened (OPT's MLP); anything else is kept.
    """
    if isinstance(recorded, (tuple, list)):
        return type(recorded)(_select_rows(part, index, n_rows) for part in recorded)
    if not isinstance(recorded, torch.Tensor) or recorded.dim() == 0 or recorded.shape[0] % n_rows:
        return recorded
    if recorded.shape[0] == n_rows:
        return recorded[index]
    by_row = recorded.view(n_rows, -1, *recorded.shape[1:])
    return by_row[index].reshape(-1, *recorded.shape[1:])


# Each position's most likely tokens under the full vocabulary hold nearly all of its softmax's mass,
# and an edit's optimisation moves them little between refreshes. (SmolLM2, 11 hallucination
# corrections of 10-53 tokens, GRACE: 64 per position refreshed every 25 steps took 4% more steps than
# the full softmax, each ~2x faster.)
SHORTLIST_PER_POSITION = 64
SHORTLIST_REFRESH_EVERY = 25


class TargetLogProbs:
    """log p(target token) at chosen (row, suffix column) positions, the softmax over a shortlist.

    An edit's optimisation reads a few target tokens' log-probabilities, but a full log-softmax
    runs the LM head over the whole vocabulary forward and backward at every step (on SmolLM2,
    49,152 x 576 per position: more arithmetic than the blocks above the edit site). Each call
    here uses a shortlist: the target tokens and each position's ``per_position`` most likely
    tokens, taken from a full-vocabulary call every ``refresh_every`` calls (the first one
    included; its values are the whole vocabulary's, its gradient the new shortlist's) and from every
    :meth:`full` check. Leaving the rest of the vocabulary out of the normaliser can only raise a
    log-probability, so a stop rule met on a shortlist must be confirmed with :meth:`full`.
    With ``refresh_dtype`` the periodic refreshes run the head in that dtype (a copy of its weight
    made on the first one): their values are then approximate, and only :meth:`full` is exact.
    Each call also records :attr:`on_top`, whether every target is its position's most likely
    token: exact after a full-vocabulary call; after a shortlisted one a necessary condition only
    (a token outside the shortlist may still beat a target).

    Args:
        model: the causal LM (its head gives the logits).
        rows, columns, tokens: per target token, where it is predicted and its id.
        refresh_dtype: the dtype of the periodic refreshes (None: the model's). On a CPU with
            bfloat16 instructions SmolLM2's head over 37 positions takes 9 ms in bfloat16 against
            30 ms in float32; a plain linear head only (any other keeps the model's dtype).
    """

    def __init__(
        self,
        model: nn.Module,
        rows: Sequence[int],
        columns: Sequence[int],
        tokens: torch.Tensor,
        per_position: int = SHORTLIST_PER_POSITION,
        refresh_every: int = SHORTLIST_REFRESH_EVERY,
        refresh_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        head = lm_head(model)
        if not isinstance(head, nn.Linear) or head.weight.dtype == refresh_dtype:
            refresh_dtype = None
        self.refresh_dtype = refresh_dtype
        self._refresh_weight: torch.Tensor | None = None  # the head's weight in refresh_dtype, made once
        self.rows, self.columns = torch.as_tensor(rows), torch.as_tensor(columns)
        self.tokens = torch.as_tensor(tokens).reshape(-1)
        self.per_position, self.refresh_every = per_position, refresh_every
        self.shortlist: torch.Tensor | None = None  # sorted token ids
        self.exact = False  # whether the last call's values are exact (whole vocabulary, model's dtype)
        # (n,) per target, its log-probability minus the best other token's in the last call: exact
        # after a full-vocabulary call, an upper bound after a shortlisted one.
        self.leads: torch.Tensor | None = None
        self._since_refresh = 0  # calls since the shortlist was taken

    @property
    def on_top(self) -> bool:
        """Whether every target was the argmax in the last call (see above); False before any call."""
        return self.leads is not None and bool((self.leads >= 0).all())

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n,) log-probabilities of the targets; exact on refresh calls without ``refresh_dtype`` (:attr:`exact`)."""
        picked = hidden[self.rows, self.columns]
        refresh = self.shortlist is None or self._since_refresh >= self.refresh_every
        self.exact = refresh and self.refresh_dtype is None
        if not refresh:
            self._since_refresh += 1
            return self._targets_of(self._shortlist_log_probs(picked), self._target_columns)
        with torch.no_grad():
            measured = self._measure_and_refresh(picked, self._lowered_head())
        # The values are the whole vocabulary's; the gradient is the new shortlist's, which holds
        # nearly all of each position's mass: backward through the whole head would cost as much
        # as its forward pass again (SmolLM2, a 38-token target: ~35 ms of a refresh's ~120 ms).
        shortlisted = self._shortlist_log_probs(picked).gather(1, self._target_columns).squeeze(1)
        return shortlisted + (measured - shortlisted).detach()

    def _lowered_head(self) -> torch.Tensor | None:
        if self.refresh_dtype is not None and self._refresh_weight is None:
            self._refresh_weight = lm_head(self.model).weight.detach().to(self.refresh_dtype)
        return self._refresh_weight

    @torch.no_grad()
    def full(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n,) exact log-probabilities of the targets (no gradient). The caller checks this when the
        shortlist may have drifted, so the shortlist is taken afresh from the same pass."""
        return self._measure_and_refresh(hidden[self.rows, self.columns])

    def _measure_and_refresh(
        self, picked: torch.Tensor, head_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The targets' log-probabilities over the whole vocabulary at ``picked`` (n, hidden), with
        ``head_weight`` in place of the head's own if given; the shortlist becomes the targets and
        each position's ``per_position`` most likely tokens there."""
        logp = torch.log_softmax(
            logits_from_hidden(self.model, picked, head_weight=head_weight).float(), dim=-1
        )
        top = logp.topk(min(self.per_position, logp.shape[-1]), dim=-1).indices
        self.shortlist = torch.unique(torch.cat([top.reshape(-1), self.tokens.to(top.device)]))
        self._target_columns = torch.searchsorted(self.shortlist, self.tokens.to(top.device))[:, None]
        self._since_refresh = 1
        return self._targets_of(logp, self.tokens[:, None].to(logp.device))

    def _targets_of(self, logp: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The targets' entries of ``logp`` (n, vocabulary or shortlist); records :attr:`leads`."""
        picked = logp.gather(1, columns).squeeze(1)
        others = logp.detach().scatter(1, columns, float("-inf"))
        self.leads = picked.detach() - others.max(dim=-1).values
        return picked

    def _shortlist_log_probs(self, picked: torch.Tensor) -> torch.Tensor:
        logits = logits_from_hidden(self.model, picked, self.shortlist).float()
        return torch.log_softmax(logits, dim=-1)
