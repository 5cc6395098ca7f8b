"""FT-L / FT-M as an edit adapter: each edit() call trains one delta per targeted projection."""

from __future__ import annotations

import torch

from ..delta.model import DeltaTuner
from .algorithm import TrainableDelta, objective_rows, train_deltas
from .config import FTConfig


class FTTuner(DeltaTuner):
    prefix = "ft_"
    # Fine-tuning trains on all requests of one edit() call at once, as one batch per step.
    requests_per_step = None

    def compute_edit(self, config: FTConfig, requests, tokenizer):
        layout = config.layout(self.model)
        sites = {
            name: (config.block_of(self.model, name), self.model.get_submodule(name))
            for name in config.target_modules
        }
        device = next(self.model.parameters()).device
        # Each edit draws its own initial factors, reproducibly.
        generator = torch.Generator().manual_seed(config.seed + len(config.edits))
        deltas = {name: TrainableDelta(site, config.rank, generator) for name, (_, site) in sites.items()}
        rows = objective_rows(config.variant, tokenizer, requests, device=device)
        train_deltas(
            self.model,
            layout,
            sites,
            deltas,
            rows,
            num_steps=config.num_steps,
            lr=config.lr,
            early_stop_loss=config.early_stop_loss,
            norm_constraint=config.norm_constraint,
        )
        return {name: delta.payload() for name, delta in deltas.items()}

    def forget(self, adapter_name: str, entry: dict, request_index: int) -> bool:
        # One FT edit is a single delta trained on all requests of its call: no part of it belongs
        # to one request, so it can be taken out only when it holds that request alone.
        if len(entry["requests"]) != 1:
            return False
        return super().forget(adapter_name, entry, request_index)
