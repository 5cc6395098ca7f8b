"""WISE as an edit adapter: train a shard of a side memory per edit, merge shards, route per token."""

from __future__ import annotations

import warnings

import torch

from ...architectures import backbone, in_out_features, weight_out_in
from ...requests import EditRequest, tokenize_continuation
from ..per_model import context_templates
from ..site_training import (
    UNRELATED_TEXTS,
    build_target_rows,
    cached_site_inputs,
    train_added_output,
)
from ..wrapped import WrappedTuner
from .algorithm import (
    margin_loss,
    memory_threshold,
    routes_apart,
    running_mean_gaps,
    shard_mask,
    shared_prefix_lengths,
    texts_routed,
    ties_merge,
    token_gaps,
)
from .config import WiseConfig
from .layer import RoutingContext, WiseLayer
from .storage import pack_state_dict, unpack_state_dict

# Older edits (outside the shard being written) whose prompts the new shard must not fire on.
MAX_OTHER_EDITS = 100


class WiseTuner(WrappedTuner):
    prefix = "wise_"
    tuner_layer_cls = WiseLayer

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage=False, state_dict=None) -> None:
        # Shared by this tuner's layers; a hook on the backbone fills it before each forward.
        self._routing = RoutingContext()
        self._routing_hook = None
        # [texts taken, texts] for the edit being stored: compute_edit finds it, after_append records it.
        self._unrelated_routed: list[int] | None = None
        self._warned_unrelated_routed = False
        super().__init__(
            model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
        )
        config = self.peft_config[adapter_name]
        self._routing_hook = backbone(self.model, config.layout(self.model)).register_forward_pre_hook(
            _routing_context_hook(self._routing), with_kwargs=True
        )

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key=None, **kw
    ):
        super()._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key, **kw)
        getattr(parent, target_name).routing = self._routing

    # ---------------------------------------------------------------- storage
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # Side memories are zero outside their subspace: written as their non-zero entries (storage.py).
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return pack_state_dict(selected, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, unpack_state_dict(state_dict))

    def _unload_and_optionally_merge(self, *args, **kwargs):
        # The hook goes only once the layers are gone: a refused merge_and_unload must leave routing working.
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if self._routing_hook is not None:
            self._routing_hook.remove()
            self._routing_hook = None
        return model

    # ------------------------------------------------------------------ edits
    def compute_edit(self, config: WiseConfig, requests, tokenizer):
        (request,) = requests
        (target,) = config.target_modules
        adapter = next(name for name, c in self.peft_config.items() if c is config)
        layer: WiseLayer = self._layer(target)
        edit_index = len(config.edits)
        memory, shard, position = config.placement(edit_index)
        held = layer.size(adapter)
        slot = held if position == 0 else held - 1
        start = layer.wise_delta[adapter][slot].float() if position > 0 else None

        shard_requests = [r for entry in config.edits[edit_index - position :] for r in _requests(entry)]
        other_requests = [r for entry in config.edits[: edit_index - position] for r in _requests(entry)]
        replayed = shard_requests if config.replay else []
        texts = list(config.unrelated_texts or UNRELATED_TEXTS)
        ordinary = cached_site_inputs(self.model, config.layer, layer, tokenizer, texts)
        # The margins are relative to how much the projection emits on ordinary text.
        scale = (torch.cat(ordinary) @ weight_out_in(layer.get_base_layer()).float().T).norm(dim=-1).mean().item()
        others = [r.filled_prompt for r in other_requests[-MAX_OTHER_EDITS:]]
        unrelated = ordinary + cached_site_inputs(self.model, config.layer, layer, tokenizer, others)

        # The threshold is learned from the edits the memory holds: a fraction of their smallest gap.
        held_requests = shard_requests + [request]
        # Unrelated texts that open like one of these edits (every hallucination correction opens with
        # "This is a Wikipedia passage about"): a causal model gives those opening tokens the edit's own
        # keys, so the margins leave them out rather than push the same gap both up and down.
        held_rows = [sum(tokenize_continuation(tokenizer, r.filled_prompt, r.target_new), []) for r in held_requests]
        opening_shared = shared_prefix_lengths([tokenizer(t)["input_ids"] for t in texts + others], held_rows)
        shard_id = memory * config.shards_per_memory + shard  # every shard draws its own subspace
        delta = self._train_shard(
            config,
            layer,
            tokenizer,
            request,
            replayed,
            held_requests,
            unrelated,
            opening_shared,
            scale,
            shard_id,
            start,
        )

        first_slot, deltas = slot, delta[None]
        if shard == config.shards_per_memory - 1 and position == config.edits_per_shard - 1 and shard > 0:
            first_slot = slot - shard  # the memory's first shard: all of them are merged into it
            shards = torch.cat([layer.wise_delta[adapter][first_slot:slot].float(), delta[None]])
            deltas = ties_merge(shards, config.merge_density)[None]
            held_requests = [
                r for e in config.edits[edit_index - config.edits_per_memory + 1 :] for r in _requests(e)
            ]
            held_requests.append(request)
        threshold = self._threshold(config, layer, tokenizer, deltas[0], held_requests)
        # The texts the memory should leave alone (a merged memory holds its earlier shards' edits).
        held_prompts = {r.filled_prompt for r in held_requests}
        apart = ordinary + [k for text, k in zip(others, unrelated[len(ordinary) :]) if text not in held_prompts]
        taken = texts_routed(token_gaps(torch.cat(apart), deltas[0]), [k.shape[0] for k in apart], threshold.item())
        self._unrelated_routed = [taken, len(apart)]
        return {target: (first_slot, deltas, threshold[None])}

    def after_append(self, config: WiseConfig, adapter_name: str, entry: dict, tokenizer) -> None:
        """Record how many of the texts the edit's memory was trained to leave alone its router takes.

        Where training could not push their gaps under the memory's threshold, inputs like them are
        changed too: the ledger says so per edit, and the first such edit warns.
        """
        taken, texts = self._unrelated_routed
        entry["unrelated_routed"] = [taken, texts]
        if taken and not self._warned_unrelated_routed:
            self._warned_unrelated_routed = True
            warnings.warn(
                f"WISE edit {len(config.edits) - 1}: its side memory's router also takes {taken} of the "
                f"{texts} unrelated texts it was trained to leave alone (held-out texts and earlier edits' "
                "prompts), so inputs like them are changed too. Each edit's count is in its ledger entry "
                "('unrelated_routed'); this warning is given once per adapter.",
                stacklevel=2,
            )

    def _train_shard(
        self,
        config,
        layer,
        tokenizer,
        request,
        replayed,
        held_requests,
        unrelated,
        opening_shared,
        scale,
        shard_id,
        start,
    ):
        """The shard's delta after training; ``unrelated`` holds the site keys of each unrelated text, of
        which the first ``opening_shared`` tokens (per text) are left out of the margins."""
        d_in, d_out = in_out_features(layer.base_layer)
        lengths = [k.shape[0] for k in unrelated]
        distinct = torch.cat([torch.arange(n) >= shared for n, shared in zip(lengths, opening_shared)])
        unrelated = torch.cat(unrelated)
        held_keys = self._prompt_keys(config, layer, tokenizer, held_requests)
        device = unrelated.device
        distinct = distinct.to(device)
        mask = shard_mask(d_out, d_in, config.mask_ratio, config.seed, shard_id, device=device)
        base = start if start is not None else torch.zeros(d_out, d_in, device=device)
        trainable = torch.zeros(d_out, d_in, device=device, requires_grad=True)
        templates = context_templates(self.model, tokenizer, config)
        rows = build_target_rows(tokenizer, [request], templates, device=device, replayed=replayed)
        valid, predicting = rows.valid_mask(), rows.predicting_mask()
        alpha, beta, gamma = (
            m * scale for m in (config.irrelevant_margin, config.edit_margin, config.gap_margin)
        )
        satisfied = {"margins": False, "routing": False}
        # The gaps on unrelated text (thousands of tokens once earlier passages count) cost as much as a
        # step's blocks: with a compute_dtype they are computed in it too, and whatever decides the stop
        # is computed again at the model's precision.
        compute_dtype = config.torch_compute_dtype
        unrelated_lowered = unrelated.to(compute_dtype) if compute_dtype is not None else None

        def side_delta():
            return base + mask * trainable

        def routing_loss(x, added):
            delta = side_delta()
            edit_gaps = running_mean_gaps(added.norm(dim=-1), valid)[predicting]
            exact_gaps = None
            if unrelated_lowered is None:
                unrelated_gaps = exact_gaps = token_gaps(unrelated, delta)
            else:
                unrelated_gaps = token_gaps(unrelated_lowered, delta.to(compute_dtype))
            loss, holds = margin_loss(
                edit_gaps, unrelated_gaps[distinct], alpha, beta, gamma, config.irrelevant_weight
            )

            def exact():
                with torch.no_grad():
                    return token_gaps(unrelated, delta) if exact_gaps is None else exact_gaps

            if holds and exact_gaps is None:
                exact_gaps = exact()
                _, holds = margin_loss(edit_gaps.detach(), exact_gaps[distinct], alpha, beta, gamma)
            satisfied["margins"] = holds
            if config.stop_rule == "routing":
                # The threshold this shard gets (a shard about to be merged: its own, not the merged memory's).
                with torch.no_grad():
                    threshold = memory_threshold(held_keys, delta, config.act_ratio).item()
                    satisfied["routing"] = routes_apart(exact(), lengths, threshold)
            # In units of the projection's output norm, like the margins, so it weighs as much as the NLL.
            return loss / scale

        with layer.bypassed():
            train_added_output(
                self.model,
                config.layout(self.model),
                config.layer,
                layer,
                rows,
                [trainable],
                added_output=lambda x: x @ side_delta().T,
                extra_loss=routing_loss,
                steps=config.num_steps,
                lr=config.lr,
                early_stop_loss=config.early_stop_loss,
                done=lambda: satisfied[config.stop_rule],
                optimizer=config.optimizer,
                learnt_at_argmax=config.stop_rule == "routing",
                compute_dtype=config.torch_compute_dtype,
            )
        return side_delta().detach()

    def _threshold(self, config, layer, tokenizer, delta, requests) -> torch.Tensor:
        return memory_threshold(self._prompt_keys(config, layer, tokenizer, requests), delta, config.act_ratio)

    def _prompt_keys(self, config, layer, tokenizer, requests) -> list[torch.Tensor]:
        return cached_site_inputs(self.model, config.layer, layer, tokenizer, [r.filled_prompt for r in requests])


def _requests(entry):
    return [EditRequest.from_dict(r) for r in entry["requests"]]


def _routing_context_hook(context: RoutingContext):
    """A forward pre-hook for the backbone: record the attention mask and whether a cache continues a text."""

    def hook(_module, _args, kwargs):
        context.attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        context.continues = _cached_tokens(cache) > 0
        return None

    return hook


def _cached_tokens(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(cache[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0
