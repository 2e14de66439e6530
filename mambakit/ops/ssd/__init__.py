"""Mamba-2 SSD (structured state space duality): public functions, argument checks and dispatch.

Every implementation in `_IMPLS` (`_STEP_IMPLS`) takes the arguments of `ssd` (`ssd_state_update`)
without `backend`, already checked here, and returns what the public function returns.
"""
from __future__ import annotations

import torch

from .._common import (FLOAT_DTYPES, INDEX_DTYPES, STEP_STATE_DTYPES, check_dtype, check_same_device, check_shape,
                       dispatch)
from . import reference, step
from .reference import DEFAULT_DT_LIMIT, check_dt_limit

__all__ = ["ssd", "mamba_chunk_scan_combined", "ssd_state_update", "ssd_state_update_unchecked"]



def _triton_paths():
    """The Triton paths, imported only once chosen (an import statement: torch.compile traces it, while
    importlib.import_module breaks the graph)."""
    from mambakit.ops.ssd import triton_ssd, triton_step

    return triton_ssd, triton_step


_IMPLS = {"reference": lambda: reference.ssd, "triton": lambda: _triton_paths()[0].ssd}
_STEP_IMPLS = {"reference": lambda: step.ssd_state_update, "triton": lambda: _triton_paths()[1].ssd_state_update}


def ssd(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=DEFAULT_DT_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None,
        return_final_states=False, return_varlen_states=False, backend=None):
    """Mamba-2 selective state space layer core, computed chunk by chunk.

    Per head: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t, out = y * silu(z),
    with dt = clamp(softplus(dt + dt_bias)) (softplus if dt_softplus, clamp only for a non-default dt_limit).

    x, z: (batch, L, nheads, headdim); dt: (batch, L, nheads); A: (nheads,) fp32, negative;
    B, C: (batch, L, ngroups, N), ngroups divides nheads (head h uses group h // (nheads // ngroups));
    D: (nheads,) or (nheads, headdim); dt_bias: (nheads,); initial_states: (batch, nheads, headdim, N);
    seq_idx: (batch, L) int: the state resets to zero where it changes (the initial states belong
    to the first sequence); cu_seqlens: (num_seqs + 1,) int, batch 1, the packed
    sequences' boundaries (0, ..., L); when seq_idx is not given it is derived from cu_seqlens.
    Any L; chunk_size changes speed, not results.
    Returns out (batch, L, nheads, headdim) in x's dtype, then with return_final_states
    final_states (batch, nheads, headdim, N) fp32, then with return_varlen_states (needs cu_seqlens)
    varlen_states (num_seqs, nheads, headdim, N) fp32, the state after each packed sequence.
    """
    _check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx,
                    cu_seqlens, return_varlen_states)
    if seq_idx is not None:
        seq_idx = number_sequences(seq_idx)
    elif cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    return dispatch(_IMPLS, backend, x)(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
        return_final_states=return_final_states, return_varlen_states=return_varlen_states)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT,
                              return_final_states=False, return_varlen_states=False, backend=None):
    """`ssd` under the official `mamba_ssm` name and argument order (same shapes and results)."""
    return ssd(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
               dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
               return_final_states=return_final_states, return_varlen_states=return_varlen_states,
               backend=backend)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=DEFAULT_DT_LIMIT, backend=None, A_log=None):
    """One decoding step of SSD: h = exp(dt A) h + dt x B^T, y = h C + D x, out = y * silu(z).

    state: (batch, nheads, headdim, N) fp32 (or bf16 / fp16: half the bytes a step moves, math still fp32,
    rounded once per step; or fp64), updated in place; x, z: (batch, nheads, headdim);
    dt: (batch, nheads); A: (nheads,); B, C: (batch, ngroups, N); D: (nheads,) or (nheads, headdim);
    dt_bias: (nheads,); dt is processed as in `ssd`. A_log (a mambakit addition): give A=None and the
    layer's A_log (nheads,) instead; A = -exp(A_log) is then computed inside the step (no extra launches).
    Inputs may be strided views. Returns out (batch, nheads, headdim) in x's dtype.
    """
    _check_step_args(state, x, dt, A, B, C, D, z, dt_bias, dt_limit, A_log)
    return ssd_state_update_unchecked(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, backend, A_log)


def ssd_state_update_unchecked(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               dt_limit=DEFAULT_DT_LIMIT, backend=None, A_log=None):
    """`ssd_state_update` without its argument checks, for a layer's decode step: its arguments are its own
    parameters, cached state and projections, right by construction, and the checks cost more host time per
    token than the step's small tensor ops on a CPU."""
    return dispatch(_STEP_IMPLS, backend, x)(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                              dt_softplus=dt_softplus, dt_limit=dt_limit, A_log=A_log)


def number_sequences(seq_idx):
    """seq_idx (batch, L) -> (batch, L) int32 counting its changes so far: 0, 0, 1, 1, 2, ...

    The same resets as seq_idx, in the non-decreasing form from 0 that every path can rely on.
    """
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return torch.cat([torch.zeros_like(changes[:, :1]), changes.cumsum(dim=1, dtype=torch.int32)], dim=1)


def seq_idx_from_cu_seqlens(cu_seqlens, seqlen):
    """cu_seqlens (num_seqs + 1,) -> seq_idx (1, seqlen) int32: position t gets the index of its sequence."""
    positions = torch.arange(seqlen, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:-1].long(), positions, right=True)).to(torch.int32)[None]


def _check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx,
                    cu_seqlens, return_varlen_states):
    check_shape("x", x, None, None, None, None)  # (batch, L, nheads, headdim)
    batch, seqlen, nheads, headdim = x.shape
    if seqlen == 0:
        raise ValueError("x: expected at least one time step, got L=0")
    check_shape("dt", dt, batch, seqlen, nheads)
    check_shape("A", A, nheads)
    check_shape("B", B, batch, seqlen, None, None)  # (batch, L, ngroups, N)
    ngroups, N = B.shape[2:]
    if ngroups == 0 or nheads % ngroups != 0:
        raise ValueError(f"B: ngroups must divide nheads={nheads}, got ngroups={ngroups}")
    check_shape("C", C, batch, seqlen, ngroups, N)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    _check_D(D, nheads, headdim)
    check_shape("z", z, batch, seqlen, nheads, headdim)
    check_shape("dt_bias", dt_bias, nheads)
    check_shape("initial_states", initial_states, batch, nheads, headdim, N)
    check_shape("seq_idx", seq_idx, batch, seqlen)
    for name, t in dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states).items():
        check_dtype(name, t, FLOAT_DTYPES)
    check_dtype("seq_idx", seq_idx, INDEX_DTYPES)
    check_dt_limit(dt_limit)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, batch, seqlen, seq_idx)
    elif return_varlen_states:
        raise ValueError("cu_seqlens: return_varlen_states=True needs cu_seqlens, got None")
    check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                      seq_idx=seq_idx, cu_seqlens=cu_seqlens)


def _check_cu_seqlens(cu_seqlens, batch, seqlen, seq_idx):
    """cu_seqlens must be (0, ..., L), strictly increasing, with batch 1, and agree with seq_idx if given."""
    check_dtype("cu_seqlens", cu_seqlens, INDEX_DTYPES)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected shape (num_seqs + 1,), num_seqs >= 1, got {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: packed sequences need batch 1, got batch {batch}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seqlen or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens: expected strictly increasing from 0 to L={seqlen}, got {bounds}")
    if seq_idx is not None:
        starts = (seq_idx[0, 1:] != seq_idx[0, :-1]).nonzero().flatten() + 1
        if starts.tolist() != bounds[1:-1]:
            raise ValueError(f"seq_idx: its sequence starts {starts.tolist()} differ from cu_seqlens {bounds}")


def _check_step_args(state, x, dt, A, B, C, D, z, dt_bias, dt_limit, A_log):
    check_shape("state", state, None, None, None, None)
    check_dtype("state", state, STEP_STATE_DTYPES)
    if not state.is_contiguous():
        raise ValueError("state: expected a contiguous tensor (it is updated in place)")
    batch, nheads, headdim, N = state.shape
    check_shape("x", x, batch, nheads, headdim)
    check_shape("dt", dt, batch, nheads)
    if (A is None) == (A_log is None):
        raise ValueError("A, A_log: expected exactly one of them, got "
                         f"{'both' if A is not None else 'neither'}")
    check_shape("A", A, nheads)
    check_shape("A_log", A_log, nheads)
    check_shape("B", B, batch, None, N)
    ngroups = B.shape[1]
    if ngroups == 0 or nheads % ngroups != 0:
        raise ValueError(f"B: ngroups must divide nheads={nheads}, got ngroups={ngroups}")
    check_shape("C", C, batch, ngroups, N)
    check_shape("z", z, batch, nheads, headdim)
    check_shape("dt_bias", dt_bias, nheads)
    _check_D(D, nheads, headdim)
    for name, t in dict(x=x, dt=dt, A=A, A_log=A_log, B=B, C=C, D=D, z=z, dt_bias=dt_bias).items():
        check_dtype(name, t, FLOAT_DTYPES)
    check_dt_limit(dt_limit)
    check_same_device(state=state, x=x, dt=dt, A=A, A_log=A_log, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


def _check_D(D, nheads, headdim):
    """D is per head (nheads,) or per channel (nheads, headdim)."""
    if isinstance(D, torch.Tensor) and D.dim() == 2:
        check_shape("D", D, nheads, headdim)
    else:
        check_shape("D", D, nheads)
