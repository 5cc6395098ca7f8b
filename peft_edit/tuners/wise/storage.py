"""How WISE's side memories are written to disk: only their non-zero entries.

A shard is trained inside its own random subspace (``mask_ratio`` of the projection's entries,
20 % by default) and is zero elsewhere, and a Ties merge keeps only a ``merge_density`` of each
shard's entries; stored dense, every memory would cost a full copy of the projection. A
checkpoint instead holds, for ``wise_delta``:

* ``wise_delta``: the non-zero entries, flattened in order;
* ``wise_delta_support``: which entries those are, one bit each (``uint8``, most significant bit first);
* ``wise_delta_shape``: the dense shape ``(slots, out, in)``.

Loading puts the dense tensor back before peft maps the keys onto the model, so the layer never
sees the packed form. A checkpoint with a dense ``wise_delta`` and no support (older ones) loads
as it is.
"""

from __future__ import annotations

import torch

PACKED = "wise_delta"
SUPPORT = "wise_delta_support"
SHAPE = "wise_delta_shape"
_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, support bits, shape)`` of a tensor, keeping its non-zero entries only."""
    flat = dense.detach().reshape(-1)
    support = flat != 0
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = support.to(torch.uint8)
    bits = (padded.view(-1, 8) * _BIT_VALUES.to(flat.device)).sum(-1, dtype=torch.uint8)
    return flat[support].clone(), bits, torch.tensor(dense.shape, dtype=torch.int64)


def unpack(values: torch.Tensor, bits: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The dense tensor :func:`pack` was given."""
    size = int(torch.prod(shape))
    support = (bits[:, None] & _BIT_VALUES.to(bits.device)).ne(0).reshape(-1)[:size]
    if int(support.sum()) != values.numel():
        raise ValueError(
            f"The checkpoint's {PACKED} holds {values.numel()} values but its {SUPPORT} marks "
            f"{int(support.sum())} entries: the adapter file is damaged; save the adapter again."
        )
    dense = torch.zeros(size, dtype=values.dtype, device=values.device)
    dense[support] = values
    return dense.reshape(tuple(int(n) for n in shape))


def pack_state_dict(state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """Replace every ``….wise_delta.<adapter>`` of an adapter state dict by its packed form."""
    out = {}
    suffix = f".{PACKED}.{adapter_name}"
    for key, tensor in state_dict.items():
        if not key.endswith(suffix):
            out[key] = tensor
            continue
        stem = key[: -len(suffix)]
        values, bits, shape = pack(tensor)
        out[key] = values
        out[f"{stem}.{SUPPORT}.{adapter_name}"] = bits
        out[f"{stem}.{SHAPE}.{adapter_name}"] = shape
    return out


def unpack_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_state_dict` on checkpoint keys (no adapter name in them)."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(f".{SUPPORT}")]:
        stem = key[: -len(f".{SUPPORT}")]
        values_key, shape_key = f"{stem}.{PACKED}", f"{stem}.{SHAPE}"
        if values_key not in out or shape_key not in out:
            raise ValueError(
                f"The checkpoint has {key} but not {values_key} and {shape_key}: the adapter file is damaged; "
                "save the adapter again."
            )
        out[values_key] = unpack(out[values_key], out.pop(key), out.pop(shape_key))
    return out
