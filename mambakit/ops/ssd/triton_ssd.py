"""Fused Triton SSD: launchers, custom ops (torch.compile sees two opaque ops, forward and
backward) and the differentiable `ssd` that `mambakit.ops.ssd` dispatches to on CUDA.

The kernels are in `triton_chunk.py`. Arguments arrive already checked by `mambakit.ops.ssd.ssd`,
with seq_idx numbered 0, 1, 2, ... (derived from cu_seqlens when only that was given).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from torch import Tensor

from .._common import custom_op_if_compiling, eager_autograd
from .._triton import wide_offsets
from .reference import DEFAULT_DT_LIMIT

BLOCK_T = 64  # rows per tensor-core block
BLOCK_STATE_P = 16  # headdim rows per program of the state recurrence
# Launch options per kernel (warps, software-pipelining depth). scan_fwd: the best of a sweep on an H200
# (benchmarks/ssd_launch_sweep.py: forward 0.80x at 128 x 2K); scan_bwd_dbdc 8 x 3: fwd+bwd at 8 x 2K
# 1.98 -> 1.58 ms against the earlier 4 x 2 on an H100 (ssd_launch_sweep-h100.json), same results bit for bit.
LAUNCH = {
    "chunk_state": dict(num_warps=4, num_stages=2),
    "scan_fwd": dict(num_warps=4, num_stages=2),
    "scan_bwd_dx": dict(num_warps=4, num_stages=1),
    "scan_bwd_dbdc": dict(num_warps=8, num_stages=3),
}


def _pow2(n: int) -> int:
    """Tile width for a dimension of size n: a power of two, at least 16 (the tensor-core minimum)."""
    return max(16, triton.next_power_of_2(n))


def internal_chunk(chunk_size: int) -> int:
    """The chunk the kernels use: a power of two in [16, 256] not above chunk_size (results do not depend on it)."""
    return min(256, max(16, 1 << (chunk_size.bit_length() - 1)))


def _prec(x: Tensor) -> str:
    """tl.dot precision: exact fp32 products for fp32 inputs (tf32 would miss 1e-4), else ignored."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _sizes(x, B, chunk_size):
    """batch, L, nheads, headdim, ngroups, N, chunk Q, block rows BT, number of chunks."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = internal_chunk(chunk_size)
    return batch, L, H, P, G, N, Q, min(BLOCK_T, Q), -(-L // Q)


def _rows(t: Tensor) -> Tensor:
    """t (batch, L, ...) as the forward kernels read it: any batch and step strides, the rest packed
    (in Mamba2, x, B, C and dt are views of one projection: read in place, not copied)."""
    packed = t.stride(-1) == 1 and (t.dim() < 4 or t.stride(-2) == t.shape[-1])
    return t if packed else t.contiguous()


def _dt_limit_args(dt_min: float, dt_max: float) -> tuple[float, float, bool]:
    """(low, high, clamp?) for the kernels: no clamp at the default limit; inf made a finite fp32."""
    has_limit = (dt_min, dt_max) != DEFAULT_DT_LIMIT
    return (dt_min if has_limit else 0.0), (min(dt_max, 3.0e38) if has_limit else 0.0), has_limit


def ssd_forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states,
                seq_idx, cu_seqlens, return_varlen_states, store_y):
    """Run the four forward kernels (and the varlen one when asked).

    Returns out (b, L, H, P) in x's dtype, final_states (b, H, P, N) fp32, varlen_states
    (num_seqs, H, P, N) fp32 or empty, y before the gate (z given and store_y) or empty, and the
    buffers the backward reads: cs and dt (b, H, nchunks, Q) fp32, entering states (b, nchunks, H, P, N)
    fp32, and C B^T within each chunk (b, G, nchunks, Q, Q) fp32.
    """
    from . import triton_chunk as k

    batch, L, H, P, G, N, Q, BT, nchunks = _sizes(x, B, chunk_size)
    dev = x.device
    none = torch.empty(0, device=dev)
    x, dt, B, C = _rows(x), _rows(dt), _rows(B), _rows(C)
    z = z.contiguous() if z is not None else None
    lo, hi, has_limit = _dt_limit_args(dt_min, dt_max)
    BP, BN = _pow2(P), _pow2(N)
    f32 = dict(device=dev, dtype=torch.float32)
    dtp = torch.empty(batch, H, nchunks, Q, **f32)
    cs = torch.empty(batch, H, nchunks, Q, **f32)
    states = torch.empty(batch, nchunks, H, P, N, **f32)
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else none
    out = x.new_empty(x.shape)  # contiguous, whatever x's strides
    y = x.new_empty(x.shape) if (z is not None and store_y) else torch.empty(0, device=dev)
    NB = Q // BT
    cb = torch.empty(batch, G, nchunks, Q, Q, **f32)
    wide = wide_offsets(x, dt, B, C, z, out, y, states, cb, initial_states)  # cs, dtp: smaller than out
    prec = _prec(x)
    k._chunk_state_fwd[(batch * H, nchunks)](
        x, dt, A, B, dt_bias if dt_bias is not None else none, seq, dtp, cs, states,
        L, H, G, P, N, nchunks, lo, hi, *x.stride()[:2], *dt.stride()[:2], *B.stride()[:2],
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit, HAS_SEQ=seq_idx is not None,
        Q=Q, BT=BT, BP=BP, BN=BN, PREC=prec, WIDE=wide, **LAUNCH["chunk_state"])
    final = torch.empty(batch, H, P, N, **f32)
    init = initial_states.contiguous() if initial_states is not None else none
    k._state_passing[(batch * H, triton.cdiv(P, BLOCK_STATE_P))](
        states, cs, seq, init, final, none, none, L, H, P, N, nchunks,
        HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, REVERSE=False,
        Q=Q, BPS=BLOCK_STATE_P, BN=BN, WIDE=wide, num_warps=4)
    k._chunk_cb[(nchunks * NB * NB, batch * G)](B, C, cb, L, G, N, nchunks, *B.stride()[:2], *C.stride()[:2],
                                                Q=Q, BT=BT, BN=BN, PREC=prec, WIDE=wide, **LAUNCH["chunk_state"])
    Dc = D.contiguous() if D is not None else none
    k._chunk_scan_fwd[(H * NB, nchunks, batch)](
        x, z if z is not None else none, C, cb, Dc, states, cs, dtp, seq, out, y,
        L, H, G, P, N, nchunks, *x.stride()[:2], *C.stride()[:2],
        HAS_Z=z is not None, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
        HAS_SEQ=seq_idx is not None, STORE_Y=y.numel() > 0, Q=Q, BT=BT, BP=BP, BN=BN, PREC=prec, WIDE=wide,
        **LAUNCH["scan_fwd"])
    varlen = torch.empty(0, device=dev)  # outputs of a custom op must not alias one another
    if return_varlen_states:
        nseq = cu_seqlens.numel() - 1
        varlen = torch.empty(nseq, H, P, N, **f32)
        k._varlen_states[(nseq, H)](x, B, states, cs, dtp, seq, cu_seqlens.contiguous(), varlen,
                                    L, H, G, P, N, nchunks, x.stride(1), B.stride(1), Q=Q, BT=BT, BP=BP, BN=BN, PREC=prec, num_warps=4)
    return out, final, varlen, y, cs, dtp, states, cb


def _head_splits(batch, G, H, nblocks_total, device) -> int:
    """Heads of a group are looped over in one program; split them when that leaves the GPU idle."""
    heads_per_group = H // G
    if device.type != "cuda":
        return min(2, heads_per_group)  # exercise the split path in the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = nblocks_total * batch * G
    return max(1, min(heads_per_group, -(-2 * sms // programs)))


def ssd_backward(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                 initial_states, seq_idx, y, cs, dtp, states, cb):
    """Gradients of every input from the forward's buffers. Returns (dx, ddt, dA, dB, dC, dD, dz,
    ddt_bias, dinitial_states); an absent input gets an empty tensor."""
    from . import triton_chunk as k

    batch, L, H, P, G, N, Q, BT, nchunks = _sizes(x, B, chunk_size)
    NB = Q // BT
    dev = x.device
    none = torch.empty(0, device=dev)
    f32 = dict(device=dev, dtype=torch.float32)
    x, dt, B, C, dout = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous(), dout.contiguous()
    z = z.contiguous() if z is not None else None
    lo, hi, has_limit = _dt_limit_args(dt_min, dt_max)
    BP, BN = _pow2(P), _pow2(N)
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else none
    has_seq = seq_idx is not None
    prec = _prec(x)

    # Gradient of the state entering / leaving each chunk.
    dstates = torch.empty(batch, nchunks, H, P, N, **f32)
    k._chunk_dstate_direct[(batch * H, nchunks)](
        dout, z if z is not None else none, C, cs, seq, dstates, L, H, G, P, N, nchunks,
        HAS_Z=z is not None, HAS_SEQ=has_seq, Q=Q, BT=BT, BP=BP, BN=BN, PREC=prec, **LAUNCH["chunk_state"])
    n_pblocks = triton.cdiv(P, BLOCK_STATE_P)
    dcarry = torch.empty(batch, H, nchunks, n_pblocks, **f32)
    dinit = torch.empty(batch, H, P, N, **f32)
    dfinal = dfinal.contiguous() if dfinal is not None else None
    k._state_passing[(batch * H, n_pblocks)](
        dstates, cs, seq, dfinal if dfinal is not None else none, dinit, states, dcarry, L, H, P, N, nchunks,
        HAS_INIT=dfinal is not None, HAS_SEQ=has_seq, REVERSE=True, Q=Q, BPS=BLOCK_STATE_P, BN=BN, num_warps=4)

    # Every other gradient, block by block: per head, then dB and dC per group.
    dx = torch.empty_like(x)
    dz = torch.empty_like(z) if z is not None else torch.empty(0, device=dev)
    ddt_direct = torch.empty(batch, H, nchunks, Q, **f32)
    dcs = torch.empty(batch, H, nchunks, Q, **f32)
    dstate_w = torch.empty(batch, H, nchunks, Q, **f32)
    d_per_channel = D is not None and D.dim() == 2
    dD_parts = torch.zeros(batch, nchunks * NB, H, P if d_per_channel else 1, **f32) if D is not None else none
    k._chunk_scan_bwd_dx[(batch * H, nchunks * NB)](
        x, z if z is not None else none, dout, y if z is not None else none, B, C, cb,
        D.contiguous() if D is not None else none, states, dstates, cs, dtp, seq,
        dx, dz, ddt_direct, dcs, dstate_w, dD_parts, L, H, G, P, N, nchunks,
        HAS_Z=z is not None, HAS_D=D is not None, D_PER_CHANNEL=d_per_channel, HAS_SEQ=has_seq,
        Q=Q, BT=BT, BP=BP, BN=BN, PREC=prec, **LAUNCH["scan_bwd_dx"])
    splits = _head_splits(batch, G, H, nchunks * NB, dev)
    heads_per_split = -(-(H // G) // splits)
    dB_parts = torch.empty(splits, batch, L, G, N, **f32)
    dC_parts = torch.empty(splits, batch, L, G, N, **f32)
    k._chunk_scan_bwd_dbdc[(nchunks * NB, batch * G, splits)](
        x, z if z is not None else none, dout, B, C, states, dstates, cs, dtp, seq, dB_parts, dC_parts,
        L, H, G, P, N, nchunks, heads_per_split, batch * L * G * N,
        HAS_Z=z is not None, HAS_SEQ=has_seq, Q=Q, BT=BT, BP=BP, BN=BN, PREC=prec, **LAUNCH["scan_bwd_dbdc"])

    # dt, A, dt_bias.
    ddt = torch.empty_like(dt)
    dA_parts = torch.empty(batch, H, nchunks, **f32)
    dbias_parts = torch.empty(batch, H, nchunks, **f32)
    k._dt_bwd[(nchunks, batch * H)](
        dt, dt_bias if dt_bias is not None else none, A, dtp, dcs, ddt_direct, dstate_w, dcarry,
        ddt, dA_parts, dbias_parts, L, H, nchunks, n_pblocks, lo, hi,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
        Q=Q, BCARRY=triton.next_power_of_2(n_pblocks), num_warps=4)

    dB = dB_parts.sum(0).to(B.dtype)
    dC = dC_parts.sum(0).to(C.dtype)
    dA = dA_parts.sum((0, 2)).to(A.dtype)
    dD = torch.empty(0, device=dev)  # outputs of a custom op must not alias one another
    if D is not None:
        dD = dD_parts.sum((0, 1)).reshape(D.shape).to(D.dtype)
    dbias = dbias_parts.sum((0, 2)).to(dt_bias.dtype) if dt_bias is not None else torch.empty(0, device=dev)
    dinit = dinit.to(initial_states.dtype) if initial_states is not None else torch.empty(0, device=dev)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit


# --- custom ops: opaque to torch.compile, differentiable through register_autograd; eager calls take
# the same bodies through an autograd.Function (see custom_op_if_compiling) -------------------------

def _ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
             dt_min: float, dt_max: float, initial_states: Optional[Tensor], seq_idx: Optional[Tensor],
             cu_seqlens: Optional[Tensor], return_varlen_states: bool, store_y: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return ssd_forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states,
                       seq_idx, cu_seqlens, return_varlen_states, store_y)


_ssd_fwd_op = torch.library.custom_op("mambakit::ssd_fwd", _ssd_fwd, mutates_args=())


@_ssd_fwd_op.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx,
      cu_seqlens, return_varlen_states, store_y):
    batch, L, H, P, G, N, Q, BT, nchunks = _sizes(x, B, chunk_size)
    f32 = dict(device=x.device, dtype=torch.float32)
    nseq = cu_seqlens.shape[0] - 1 if return_varlen_states else 0
    varlen = x.new_empty(nseq, H, P, N, dtype=torch.float32) if return_varlen_states else x.new_empty(0, dtype=torch.float32)
    # Contiguous like the real outputs (the forward copies strided inputs first).
    y = x.new_empty(x.shape) if (z is not None and store_y) else x.new_empty(0, dtype=torch.float32)
    return (x.new_empty(x.shape), x.new_empty(batch, H, P, N, **f32), varlen, y,
            x.new_empty(batch, H, nchunks, Q, **f32), x.new_empty(batch, H, nchunks, Q, **f32),
            x.new_empty(batch, nchunks, H, P, N, **f32), x.new_empty(batch, G, nchunks, Q, Q, **f32))


def _ssd_bwd(dout: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             chunk_size: int, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
             dt_softplus: bool, dt_min: float, dt_max: float, initial_states: Optional[Tensor],
             seq_idx: Optional[Tensor], y: Tensor, cs: Tensor, dtp: Tensor, states: Tensor, cb: Tensor
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return ssd_backward(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                        initial_states, seq_idx, y, cs, dtp, states, cb)


_ssd_bwd_op = torch.library.custom_op("mambakit::ssd_bwd", _ssd_bwd, mutates_args=())


@_ssd_bwd_op.register_fake
def _(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states,
      seq_idx, y, cs, dtp, states, cb):
    def like(t):  # contiguous like the real gradients, whatever the inputs' strides
        return t.new_empty(t.shape) if t is not None else x.new_empty(0, dtype=torch.float32)

    return (like(x), like(dt), like(A), like(B), like(C), like(D), like(z), like(dt_bias), like(initial_states))


_FWD_INPUTS = ("x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "dt_softplus", "dt_min", "dt_max",
               "initial_states", "seq_idx", "cu_seqlens", "return_varlen_states", "store_y")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_INPUTS, inputs))
    _, _, _, y, cs, dtp, states, cb = output
    ctx.save_for_backward(args["x"], args["dt"], args["A"], args["B"], args["C"], args["D"], args["z"],
                          args["dt_bias"], args["initial_states"], args["seq_idx"], y, cs, dtp, states, cb)
    ctx.options = (args["chunk_size"], args["dt_softplus"], args["dt_min"], args["dt_max"])
    ctx.has_initial = args["initial_states"] is not None


def _backward(ctx, dout, dfinal, *unused, backward=_ssd_bwd_op):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, y, cs, dtp, states, cb = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max = ctx.options
    if dout is None:
        dout = torch.zeros_like(x)
    grads = backward(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                     initial_states, seq_idx, y, cs, dtp, states, cb)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dinit = grads
    present = lambda g, t: g if t is not None else None  # noqa: E731
    return (dx, ddt, dA, dB, dC, None, present(dD, D), present(dz, z), present(dbias, dt_bias), None, None, None,
            present(dinit, initial_states), None, None, None, None)


_ssd_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_ssd_fwd_eager = eager_autograd(_ssd_fwd, _setup_context, functools.partial(_backward, backward=_ssd_bwd))


def ssd(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=DEFAULT_DT_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None,
        return_final_states=False, return_varlen_states=False):
    """Fused Triton SSD with the contract of `mambakit.ops.ssd.ssd` (arguments already checked).

    x, z: (batch, L, nheads, headdim); dt: (batch, L, nheads); A: (nheads,); B, C: (batch, L, ngroups, N).
    Returns out [, final_states (batch, nheads, headdim, N) fp32] [, varlen_states (num_seqs, nheads, headdim, N)].
    Gradients flow to every tensor input except through varlen_states.
    """
    if x.dtype == torch.float64:
        raise TypeError("x: the triton SSD path runs in float32/bfloat16/float16, got float64 (use backend='reference')")
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    store_y = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, final, varlen, *_ = custom_op_if_compiling(_ssd_fwd_op, _ssd_fwd_eager)(
        x, dt, A, B, C, int(chunk_size), D, z, dt_bias, bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]),
        initial_states, seq_idx, cu_seqlens, bool(return_varlen_states), store_y)
    results = [out]
    if return_final_states:
        results.append(final)
    if return_varlen_states:
        results.append(varlen.detach())
    return out if len(results) == 1 else tuple(results)
