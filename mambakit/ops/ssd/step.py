"""One decoding step of Mamba-2 SSD: advance the recurrent state by a single token, in place."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import FLOAT_DTYPES, check_dtype, check_same_device, check_shape
from .reference import DEFAULT_DT_LIMIT, check_dt_limit, prepare_dt


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=DEFAULT_DT_LIMIT):
    """h = exp(dt * A) h + dt x B^T; y = h C + D x; out = y * silu(z) when z is given.

    state: (batch, nheads, headdim, N) fp32, updated in place; x, z: (batch, nheads, headdim);
    dt: (batch, nheads); A: (nheads,); B, C: (batch, ngroups, N); D: (nheads,) or (nheads, headdim);
    dt_bias: (nheads,). Returns out (batch, nheads, headdim) in x's dtype.
    """
    _check_step_args(state, x, dt, A, B, C, D, z, dt_bias, dt_limit)
    batch, nheads, headdim, N = state.shape
    ngroups = B.shape[1]
    dtype = state.dtype
    dt = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # (batch, nheads)
    decay = torch.exp(dt * A.to(dtype))

    # Heads of one group share B and C: view the state as (batch, ngroups, heads_in_group * headdim, N)
    # so that both the update and the readout are batched matrix products with no copy of B or C.
    grouped = state.view(batch, ngroups, -1, N)
    x_dt = (x.to(dtype) * dt[..., None]).view(batch, ngroups, -1, 1)
    state.mul_(decay[..., None, None])
    grouped.add_(x_dt @ B.to(dtype)[:, :, None, :])
    y = (grouped @ C.to(dtype)[..., None]).view(batch, nheads, headdim)
    if D is not None:
        D = D.to(dtype)
        y = y + x.to(dtype) * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)


def _check_step_args(state, x, dt, A, B, C, D, z, dt_bias, dt_limit):
    check_dtype("state", state, (torch.float32, torch.float64))
    if state.dim() != 4:
        raise ValueError(f"state: expected shape (batch, nheads, headdim, N), got {tuple(state.shape)}")
    if not state.is_contiguous():
        raise ValueError("state: expected a contiguous tensor (it is updated in place)")
    batch, nheads, headdim, N = state.shape
    check_shape("x", x, batch, nheads, headdim)
    check_shape("dt", dt, batch, nheads)
    check_shape("A", A, nheads)
    check_shape("B", B, batch, None, N)
    ngroups = B.shape[1]
    if ngroups == 0 or nheads % ngroups != 0:
        raise ValueError(f"B: ngroups must divide nheads={nheads}, got ngroups={ngroups}")
    check_shape("C", C, batch, ngroups, N)
    check_shape("z", z, batch, nheads, headdim)
    check_shape("dt_bias", dt_bias, nheads)
    if D is not None and D.dim() == 2:
        check_shape("D", D, nheads, headdim)
    else:
        check_shape("D", D, nheads)
    for name, t in dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias).items():
        check_dtype(name, t, FLOAT_DTYPES)
    check_dt_limit(dt_limit)
    check_same_device(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)

