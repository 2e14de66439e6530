"""Selective scan (S6) in plain PyTorch: a loop over time, the definition of truth for every path."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for the recurrence, fp64 when the inputs are fp64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand_groups(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L): channel c uses group c // (dim // G)."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.repeat_interleave(dim // t.shape[1], dim=1)


def discretize_delta(delta, delta_bias, delta_softplus, dtype):
    """delta (+ delta_bias), through softplus when asked, in the compute dtype."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, seq_idx=None):
    """Reference selective scan; arguments and shapes as `mambakit.ops.selective_scan` (validated there).

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,  y_t = C_t . h_t + D * u_t,  out = y * silu(z).
    Where seq_idx changes, the decay is zeroed so that h restarts from zero.
    """
    dtype = compute_dtype(u)
    batch, dim, _ = u.shape
    delta = discretize_delta(delta, delta_bias, delta_softplus, dtype)
    u32 = u.to(dtype)
    B = expand_groups(B.to(dtype), dim)  # (batch, dim, N, L)
    C = expand_groups(C.to(dtype), dim)
    decay = torch.exp(delta.unsqueeze(-1) * A.to(dtype)[:, None, :])  # (batch, dim, L, N)
    if seq_idx is not None:
        new_sequence = seq_idx[:, 1:] != seq_idx[:, :-1]  # (batch, L-1)
        keep = torch.cat([new_sequence.new_zeros(batch, 1), new_sequence], dim=1).logical_not()
        decay = decay * keep[:, None, :, None].to(dtype)
    inputs = (delta * u32).unsqueeze(-1) * B.transpose(2, 3)  # (batch, dim, L, N)

    h = u32.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(dtype)
    states = []
    # unbind, not decay[:, :, t]: indexing in a loop makes the backward allocate a full-size gradient per step.
    for decay_t, input_t in zip(decay.unbind(2), inputs.unbind(2)):
        h = decay_t * h + input_t
        states.append(h)
    y = torch.einsum("bdln,bdnl->bdl", torch.stack(states, dim=2), C)
    out = skip_and_gate(y, u32, D, z).to(u.dtype)
    return (out, h) if return_final_state else out


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """y + D * u, then times silu(z): y, u, z (batch, dim, L) in the compute dtype, D (dim,)."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y
