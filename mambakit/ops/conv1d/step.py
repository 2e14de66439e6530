"""One decoding step of the causal conv: shift the rolling window, insert the new input, convolve."""
from __future__ import annotations

import torch

from mambakit.ops.conv1d.reference import apply_activation


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """conv_state (batch, dim, width) takes x (batch, dim) as its newest (last) column, in place.

    weight: (dim, width); bias: (dim,). Returns act(sum_k weight[:, k] * conv_state[:, :, k] + bias),
    (batch, dim) in x's dtype; the sum runs in fp32 (fp64 for fp64 inputs).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    conv_state[..., :-1] = conv_state[..., 1:].clone()  # clone: source and destination overlap
    conv_state[..., -1] = x
    out = (conv_state.to(dtype) * weight.to(dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(dtype)
    return apply_activation(out, activation).to(x.dtype)
