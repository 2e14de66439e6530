"""Selective scan (Mamba-1, S6): the public functions, their argument checks and the dispatch between paths.

Every path has the signature of `selective_scan` without `backend` and receives validated inputs.
"""
from __future__ import annotations

import torch

from mambakit.ops._common import (FLOAT_DTYPES, INDEX_DTYPES, STEP_STATE_DTYPES, check_dtype, check_same_device,
                                  check_shape, dispatch)
from mambakit.ops.selective_scan import cpu, reference, step

STATE_DTYPES = (torch.float32, torch.float64)


def _triton_paths():
    """The Triton paths, imported only once chosen (an import statement: torch.compile traces it)."""
    from mambakit.ops.selective_scan import triton_scan, triton_step

    return triton_scan, triton_step


_IMPLS = {
    "reference": lambda: reference.selective_scan,
    "cpu": lambda: cpu.selective_scan,
    "triton": lambda: _triton_paths()[0].selective_scan,
}
_STEP_IMPLS = {
    "reference": lambda: step.selective_state_update,
    "triton": lambda: _triton_paths()[1].selective_state_update,
}


def check_groups(name: str, t: torch.Tensor, batch: int, dim: int, state_size: int, *length: int) -> None:
    """B or C: (batch, N, *length) shared by all channels, or (batch, G, N, *length) with G dividing dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2 + len(length):
        check_shape(name, t, batch, state_size, *length)
        return
    check_shape(name, t, batch, None, state_size, *length)
    groups = t.shape[1]
    if groups == 0 or dim % groups != 0:
        raise ValueError(f"{name}: number of groups must divide dim={dim}, got {groups} (shape {tuple(t.shape)})")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, seq_idx=None, backend=None):
    """Selective scan: h_t = exp(delta_t*A) h_{t-1} + delta_t B_t u_t, y_t = C_t.h_t + D u_t, out = y*silu(z).

    u, delta, z: (batch, dim, L); A: (dim, N) fp32; B, C: (batch, N, L) or (batch, G, N, L), G dividing dim
    (channel c uses group c // (dim // G)); D, delta_bias: (dim,) fp32; initial_state: (batch, dim, N) fp32;
    seq_idx: (batch, L) int32, non-decreasing: the state restarts from zero where it changes (the initial
    state belongs to the first sequence). delta is (delta + delta_bias), then softplus if delta_softplus.
    Returns out (batch, dim, L) in u's dtype and, with return_final_state, final_state (batch, dim, N) fp32.
    """
    check_shape("u", u, None, None, None)
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError(f"u: expected a sequence length L >= 1, got shape {tuple(u.shape)}")
    check_shape("delta", delta, batch, dim, length)
    check_shape("A", A, dim, None)
    state_size = A.shape[1]
    check_groups("B", B, batch, dim, state_size, length)
    check_groups("C", C, batch, dim, state_size, length)
    check_shape("D", D, dim)
    check_shape("z", z, batch, dim, length)
    check_shape("delta_bias", delta_bias, dim)
    check_shape("initial_state", initial_state, batch, dim, state_size)
    check_shape("seq_idx", seq_idx, batch, length)
    for name, t in dict(u=u, delta=delta, B=B, C=C, z=z).items():
        check_dtype(name, t, FLOAT_DTYPES)
    for name, t in dict(A=A, D=D, delta_bias=delta_bias, initial_state=initial_state).items():
        check_dtype(name, t, STATE_DTYPES)
    check_dtype("seq_idx", seq_idx, INDEX_DTYPES)
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state, seq_idx=seq_idx)
    scan = dispatch(_IMPLS, backend, u)
    return scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                initial_state=initial_state, return_final_state=return_final_state, seq_idx=seq_idx)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """The official `mamba_ssm` spelling of `selective_scan`: returns out, or (out, last_state)."""
    return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          return_final_state=return_last_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           backend=None, A_log=None, dt_proj_weight=None):
    """One decoding step of the selective scan; `state` (batch, dim, N) is updated in place: fp32 (or bf16 /
    fp16: half the bytes a step moves, math still fp32, rounded once per step; or fp64).

    x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, G, N), G dividing dim;
    D: (dim,) fp32; dt_bias: (dim,) any float dtype (used in fp32). Returns out (batch, dim) in x's dtype.
    Inputs may be strided views.
    mambakit additions, which save the Mamba layer's step two to three launches: A=None with A_log (dim, N),
    A = -exp(A_log); dt_proj_weight (dim, R) with dt (batch, R): the step uses dt @ dt_proj_weight^T.
    """
    check_shape("state", state, None, None, None)
    batch, dim, state_size = state.shape
    check_shape("x", x, batch, dim)
    check_shape("dt_proj_weight", dt_proj_weight, dim, None)
    check_shape("dt", dt, batch, dim if dt_proj_weight is None else dt_proj_weight.shape[1])
    if (A is None) == (A_log is None):
        raise ValueError(f"A, A_log: expected exactly one of them, got {'both' if A is not None else 'neither'}")
    check_shape("A", A, dim, state_size)
    check_shape("A_log", A_log, dim, state_size)
    check_groups("B", B, batch, dim, state_size)
    check_groups("C", C, batch, dim, state_size)
    check_shape("D", D, dim)
    check_shape("z", z, batch, dim)
    check_shape("dt_bias", dt_bias, dim)
    check_dtype("state", state, STEP_STATE_DTYPES)
    for name, t in dict(x=x, dt=dt, B=B, C=C, z=z).items():
        check_dtype(name, t, FLOAT_DTYPES)
    for name, t in dict(A=A, D=D).items():
        check_dtype(name, t, STATE_DTYPES)
    for name, t in dict(A_log=A_log, dt_bias=dt_bias, dt_proj_weight=dt_proj_weight).items():  # read in fp32
        check_dtype(name, t, FLOAT_DTYPES)
    check_same_device(state=state, x=x, dt=dt, A=A, A_log=A_log, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      dt_proj_weight=dt_proj_weight)
    return selective_state_update_unchecked(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, backend, A_log,
                                            dt_proj_weight)


def selective_state_update_unchecked(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                                     backend=None, A_log=None, dt_proj_weight=None):
    """`selective_state_update` without its argument checks, for a layer's decode step: its arguments are its own
    parameters, cached state and projections, right by construction, and the checks cost more host time per
    token than the step's small tensor ops on a CPU."""
    update = dispatch(_STEP_IMPLS, backend, x)
    return update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, A_log=A_log,
                  dt_proj_weight=dt_proj_weight)


__all__ = ["selective_scan", "selective_scan_fn", "selective_state_update", "selective_state_update_unchecked"]
