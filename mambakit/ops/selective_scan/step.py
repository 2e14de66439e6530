"""One decoding step of the selective scan: the recurrence for a single token, state updated in place."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.ops._common import math_state


def per_group(t: torch.Tensor) -> torch.Tensor:
    """(batch, N) or (batch, G, N) -> a view (batch, G, 1, N) that broadcasts against (batch, G, dim//G, N)."""
    if t.dim() == 2:
        t = t.unsqueeze(1)
    return t.unsqueeze(2)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, A_log=None,
                           dt_proj_weight=None):
    """state (batch, dim, N) <- exp(dt*A) * state + dt * B * x, in place; returns out (batch, dim) in x's dtype.

    x, dt, z: (batch, dim); A: (dim, N) (or None and A_log with A = -exp(A_log)); B, C: (batch, N) or
    (batch, G, N); D, dt_bias: (dim,). With dt_proj_weight (dim, R), dt is (batch, R) and dt @ W^T is used.
    Math in state's dtype (fp32 or fp64; a bf16 / fp16 state is updated in fp32 and rounded once per step);
    B and C are broadcast per group rather than copied per channel.
    """
    stored, state = state, math_state(state)
    dtype, batch = state.dtype, state.shape[0]
    if A_log is not None:
        A = -torch.exp(A_log.to(dtype))
    if dt_proj_weight is not None:
        # In the weight's dtype, as the layer's parallel path does: a bf16 weight is not copied to fp32 per step.
        dt = F.linear(dt.to(dt_proj_weight.dtype), dt_proj_weight)
    # The bias sum converts dt to `dtype` (type promotion): one op, not two.
    dt = dt.to(dtype) if dt_bias is None else dt_bias.to(dtype) + dt
    if dt_softplus:
        dt = F.softplus(dt)
    x32 = x.to(dtype)
    state.mul_((dt.unsqueeze(-1) * A.to(dtype)).exp_())  # exp in place: one temporary, not two
    # The update in place, broadcast per group (no temporary the size of the state); the readout as
    # C @ state^T per (row, group), a batched row-vector product.
    groups_b = 1 if B.dim() == 2 else B.shape[1]
    grouped_state = state.unflatten(1, (groups_b, -1))  # a view: updating it updates `state`
    grouped_state.addcmul_((dt * x32).unflatten(1, (groups_b, -1)).unsqueeze(-1), per_group(B.to(dtype)))
    groups_c = 1 if C.dim() == 2 else C.shape[1]
    readout = state.unflatten(1, (groups_c, -1)).flatten(0, 1).transpose(1, 2)  # (batch * G, N, dim // G)
    y = torch.bmm(C.to(dtype).reshape(batch * groups_c, 1, -1), readout).view(batch, -1)
    if D is not None:
        y = y.addcmul_(D.to(dtype), x32)
    if z is not None:
        y = y.mul_(F.silu(z.to(dtype)))
    if state is not stored:
        stored.copy_(state)
    return y.to(x.dtype)
