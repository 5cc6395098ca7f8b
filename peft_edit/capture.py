"""Read what reaches chosen modules during one forward pass, and stop the pass once everything is read.

Statistics, MEMIT's keys and the side-memory methods' training inputs all need a module's input
(or a block's output) at some depth; the blocks above the deepest one asked for are never computed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook that has read all it needs, so the blocks above it are not computed
    (:func:`run_stoppable` ends the pass quietly)."""


def run_stoppable(run: Callable[[], Any]) -> Any:
    """Call ``run()`` (a forward pass) and let a hook end it early by raising :class:`StopForward`;
    returns what ``run`` returns, or None if it was stopped."""
    try:
        return run()
    except StopForward:
        return None


def capture(
    run: Callable[[], Any],
    inputs: Mapping[Hashable, nn.Module] | None = None,
    outputs: Mapping[Hashable, nn.Module] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict, dict]:
    """Call ``run()`` (a forward pass) and return ``({key: input}, {key: output})``.

    ``inputs``: modules whose first positional input is wanted; ``outputs``: modules whose
    output (its first element, for the tuples decoder blocks return) is wanted. Each tensor goes
    through ``transform`` as it is seen (e.g. to keep only some positions). The first call of each
    module counts. Hooks are removed in any case; a module the pass never reached is an error.
    """
    inputs, outputs = dict(inputs or {}), dict(outputs or {})
    wanted = len(inputs) + len(outputs)
    seen_inputs: dict = {}
    seen_outputs: dict = {}

    def keep(store: dict, key, tensor: torch.Tensor) -> None:
        if key not in store:
            store[key] = transform(tensor) if transform is not None else tensor
        if len(seen_inputs) + len(seen_outputs) == wanted:
            raise StopForward

    handles = [
        module.register_forward_pre_hook(lambda _m, args, _k=key: keep(seen_inputs, _k, args[0]))
        for key, module in inputs.items()
    ]
    handles += [
        module.register_forward_hook(
            lambda _m, _args, out, _k=key: keep(seen_outputs, _k, out[0] if isinstance(out, tuple) else out)
        )
        for key, module in outputs.items()
    ]
    try:
        run_stoppable(run)
    finally:
        for handle in handles:
            handle.remove()
    missing = [k for k in inputs if k not in seen_inputs] + [k for k in outputs if k not in seen_outputs]
    if missing:
        raise RuntimeError(f"The forward pass never reached the modules {missing}.")
    return seen_inputs, seen_outputs
