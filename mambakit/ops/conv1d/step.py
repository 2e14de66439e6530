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
    batch, dim, width = conv_state.shape
    # The shifted window built once (a new tensor: source and destination of a shift overlap), then stored.
    window = torch.cat([conv_state[..., 1:], x.to(conv_state.dtype).unsqueeze(-1)], dim=-1)
    conv_state.copy_(window)
    # The sum over the taps as a product with ones: torch's reduction over a last dimension of 4 is 3x slower.
    taps = (window.to(dtype) * weight.to(dtype)).view(batch * dim, width)
    out = (taps @ taps.new_ones(width)).view(batch, dim)
    if bias is not None:
        out = out.add_(bias.to(dtype))
    return apply_activation(out, activation).to(x.dtype)
