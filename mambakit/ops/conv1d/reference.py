"""Depthwise causal 1-D convolution in plain PyTorch: a sum over the taps, the definition of truth."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_activation(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    return x if activation is None else F.silu(x)


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                  activation=None):
    """Reference causal conv; arguments and shapes as `mambakit.ops.causal_conv1d` (validated there).

    out_t = act(bias + sum_k weight[:, k] * x_{t - (width-1) + k}), where inputs before the start are
    initial_states (or zero) and, with seq_idx, inputs of another sequence count as zero.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, dim, length = x.shape
    width = weight.shape[1]
    history = x.new_zeros(batch, dim, width - 1, dtype=dtype) if initial_states is None else initial_states.to(dtype)
    padded = torch.cat([history, x.to(dtype)], dim=-1)  # (batch, dim, width - 1 + L)
    if seq_idx is not None:
        # The history belongs to the first sequence; a position sees only inputs of its own sequence.
        padded_idx = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)

    out = torch.zeros(batch, dim, length, dtype=dtype, device=x.device)
    for k in range(width):
        tap = padded[..., k:k + length]
        if seq_idx is not None:
            tap = tap * (padded_idx[:, k:k + length] == seq_idx).unsqueeze(1).to(dtype)
        out = out + weight[:, k, None].to(dtype) * tap
    if bias is not None:
        out = out + bias[:, None].to(dtype)
    out = apply_activation(out, activation).to(x.dtype)
    if not return_final_states:
        return out

    final_states = padded[..., length:]  # the last width-1 inputs
    if seq_idx is not None:
        # They continue the last sequence only: inputs of earlier sequences are zero.
        final_states = final_states * (padded_idx[:, length:] == seq_idx[:, -1:]).unsqueeze(1).to(dtype)
    return out, final_states.to(x.dtype)
