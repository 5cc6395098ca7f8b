"""T-Patcher's layer: patch neurons beside one MLP output projection.

Per adapter: ``tp_keys`` (patches, in), ``tp_bias`` (patches,) and ``tp_values`` (patches, out).
The output becomes ``W x + Σ_p relu(k_p·x + b_p) v_p``. Each token is patched by its own key
alone, so cached decoding and a full forward pass agree, and a token where no patch fires gets
the projection's output bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ...architectures import in_out_features
from ..wrapped import WrappedLayer


class TPatcherLayer(WrappedLayer):
    adapter_layer_names = ("tp_keys", "tp_bias", "tp_values")
    method_title = "T-Patcher"
    storage = "patch neurons with a ReLU (a non-linear function of the input, not a weight change)"

    def create_adapter_state(self, adapter_name: str, size: int) -> None:
        if not hasattr(self, "tp_keys"):
            self.tp_keys = nn.ParameterDict({})
            self.tp_bias = nn.ParameterDict({})
            self.tp_values = nn.ParameterDict({})
        d_in, d_out = in_out_features(self.base_layer)
        factory = self.state_factory()
        self.tp_keys[adapter_name] = nn.Parameter(torch.zeros(size, d_in, **factory), requires_grad=False)
        self.tp_bias[adapter_name] = nn.Parameter(torch.zeros(size, **factory), requires_grad=False)
        self.tp_values[adapter_name] = nn.Parameter(torch.zeros(size, d_out, **factory), requires_grad=False)

    def size(self, adapter_name: str) -> int:
        return self.tp_keys[adapter_name].shape[0]

    @torch.no_grad()
    def append(
        self, adapter_name: str, key: torch.Tensor, bias: torch.Tensor, value: torch.Tensor
    ) -> tuple[int, int]:
        """Add the patches of one edit (keys (k, in), biases (k,), values (k, out); one patch may
        drop the first dimension); return the slice of patches they occupy."""
        keys, biases, values = (getattr(self, n)[adapter_name] for n in self.adapter_layer_names)
        key, value, bias = torch.atleast_2d(key), torch.atleast_2d(value), bias.reshape(-1)
        if (
            key.shape[1:] != keys.shape[1:]
            or value.shape[1:] != values.shape[1:]
            or not (key.shape[0] == value.shape[0] == bias.shape[0])
        ):
            raise ValueError(
                f"Patches of keys {tuple(key.shape)}, biases {tuple(bias.shape)}, values {tuple(value.shape)} do "
                f"not fit a projection of {keys.shape[1]} inputs and {values.shape[1]} outputs."
            )
        start = keys.shape[0]
        for name, old, new in zip(self.adapter_layer_names, (keys, biases, values), (key, bias, value)):
            getattr(self, name)[adapter_name] = nn.Parameter(
                torch.cat([old, new.to(old)]), requires_grad=False
            )
        return start, start + key.shape[0]

    def apply(self, adapter_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        keys, biases, values = (getattr(self, n)[adapter_name] for n in self.adapter_layer_names)
        activation = torch.relu(x.to(keys.dtype) @ keys.T + biases)  # (..., patches)
        fired = activation.amax(-1, keepdim=True) > 0
        if not fired.any():
            return output
        return torch.where(fired, output + (activation @ values).to(output.dtype), output)
