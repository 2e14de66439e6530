"""One decoding step of the selective scan: the recurrence for a single token, state updated in place."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_group(t: torch.Tensor) -> torch.Tensor:
    """(batch, N) or (batch, G, N) -> a view (batch, G, 1, N) that broadcasts against (batch, G, dim//G, N)."""
    if t.dim() == 2:
        t = t.unsqueeze(1)
    return t.unsqueeze(2)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """state (batch, dim, N) <- exp(dt*A) * state + dt * B * x, in place; returns out (batch, dim) in x's dtype.

    x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, G, N); D, dt_bias: (dim,).
    Math in state's dtype (fp32); B and C are broadcast per group rather than copied per channel.
    """
    dtype = state.dtype
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    x32 = x.to(dtype)
    state.mul_(torch.exp(dt.unsqueeze(-1) * A.to(dtype)))
    groups_b = 1 if B.dim() == 2 else B.shape[1]
    grouped_state = state.unflatten(1, (groups_b, -1))  # a view: updating it updates `state`
    grouped_state.add_((dt * x32).unflatten(1, (groups_b, -1)).unsqueeze(-1) * per_group(B.to(dtype)))
    groups_c = 1 if C.dim() == 2 else C.shape[1]
    y = (state.unflatten(1, (groups_c, -1)) * per_group(C.to(dtype))).sum(-1).flatten(1)
    if D is not None:
        y = y + D.to(dtype) * x32
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)
