"""Gated MLP (SwiGLU by default), as the official `mamba_ssm.modules.mlp.GatedMLP`."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedMLP(nn.Module):
    """fc1 -> (y, gate) -> y * activation(gate) -> fc2. Input (..., in_features), output (..., out_features).

    hidden_features defaults to int(8 * in_features / 3) and is rounded up to a multiple of `multiple_of`.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 activation=F.silu, bias: bool = False, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        if multiple_of < 1:
            raise ValueError(f"multiple_of: expected a positive int, got {multiple_of}")
        factory = {"device": device, "dtype": dtype}
        out_features = in_features if out_features is None else out_features
        hidden_features = int(8 * in_features / 3) if hidden_features is None else hidden_features
        hidden_features = -(-hidden_features // multiple_of) * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias, **factory)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * self.activation(gate))
