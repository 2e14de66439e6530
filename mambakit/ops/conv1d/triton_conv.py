"""Depthwise causal conv1d (+ SiLU, initial states, seq_idx) as Triton kernels with their autograd.

A program computes a (BLOCK_D, BLOCK_L) tile of one batch row; each of the `width` taps is one shifted
tile load (neighbouring programs' inputs come through the cache). Outputs and gradients keep x's layout:
a (batch, dim, L) x with unit stride along dim (a transposed view of a (batch, L, dim) projection) gives
outputs laid out the same way, read and written along dim in tiles long in dim; Mamba's (dim, batch, L)
layout stays (dim, batch, L). Backward: the gradient before the
activation (recomputed pre-activation) goes to an fp32 buffer, then one kernel forms the input
gradient (the transposed taps) and accumulates the weight and bias gradients atomically. Final states
and the initial-state gradient are (batch, dim, width-1) slices, done with plain tensor ops.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops._common import custom_op_if_compiling, eager_autograd
from mambakit.ops._triton import program_index
from mambakit.ops.conv1d import reference

BLOCK_D, BLOCK_L = 16, 128
# H200, Mamba-2 130M training shape (batch 8 x 2048, 1792 channels, a view of in_proj's output), 7 tiles
# tried: forward 0.135 ms at 64 x 32, 0.090 at 128 x 32; backward 0.72 -> 0.61 ms.
CHANNELS_LAST_BLOCK_D, CHANNELS_LAST_BLOCK_L = 128, 32


def _channels_last(x: Tensor) -> bool:
    """x (batch, dim, L) has unit stride along dim (and not along L)."""
    return x.stride(1) == 1 and x.stride(2) != 1 and x.shape[1] > 1


def _empty_like_layout(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty (batch, dim, L) tensor laid out in memory in x's stride order: a channels-last x, or Mamba's
    (dim, batch, L) projection output, which the next projection reads with no copy (the fakes use it too:
    their strides must match)."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))  # outermost in memory first
    return torch.empty_permuted(x.shape, order, dtype=dtype or x.dtype, device=x.device)


def _blocks(x: Tensor) -> tuple[int, int]:
    """Tile (BLOCK_D, BLOCK_L), long along x's unit-stride axis so that loads and stores coalesce."""
    return (CHANNELS_LAST_BLOCK_D, CHANNELS_LAST_BLOCK_L) if _channels_last(x) else (BLOCK_D, BLOCK_L)


@triton.jit
def _tap(x_ptr, init_ptr, seq_ptr, b, d, t, shift, L, seq_t,
         s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_sb, s_sl, mask_d,
         W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Input at position t - shift (BLOCK_D, BLOCK_L) fp32: x, the initial states before position 0,
    zero where it belongs to another sequence than position t (seq_t)."""
    s = t - shift
    inside = (t < L) & (s >= 0)
    v = tl.load(x_ptr + b * s_xb + d[:, None] * s_xd + s[None, :] * s_xl,
                mask=mask_d[:, None] & inside[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        before = (t < L) & (s < 0)
        v += tl.load(init_ptr + b * s_ib + d[:, None] * s_id + (s + W - 1)[None, :] * s_il,
                     mask=mask_d[:, None] & before[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b * s_sb + tl.maximum(s, 0) * s_sl, mask=t < L, other=0)
        v = tl.where((seq_s == seq_t)[None, :], v, 0.0)
    return v


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, out_ptr, dout_ptr, dim, L,
    s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_sb, s_sl, s_ob, s_od, s_ol,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, GRAD: tl.constexpr,
):
    """out = act(bias + sum_k w[:, k] x_{t-W+1+k}); grid (batch, dim blocks, L blocks).

    With GRAD, writes instead the gradient before the activation, dout * act'(pre), to out (fp32)."""
    b = program_index(0)
    d = program_index(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = program_index(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = d < dim
    mask = mask_d[:, None] & (t < L)[None, :]
    seq_t = t  # unused without seq_idx
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + b * s_sb + t * s_sl, mask=t < L, other=0)
    acc = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * _tap(x_ptr, init_ptr, seq_ptr, b, d, t, W - 1 - k, L, seq_t,
                                  s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_sb, s_sl, mask_d, W, HAS_INIT, HAS_SEQ)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    offs = b * s_ob + d[:, None] * s_od + t[None, :] * s_ol
    if GRAD:
        g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(acc)
            g *= sig * (1.0 + acc * (1.0 - sig))
        tl.store(out_ptr + offs, g, mask=mask)
    else:
        if SILU:
            acc *= tl.sigmoid(acc)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, init_ptr, seq_ptr, dpre_ptr, dx_ptr, dw_ptr, dbias_ptr, dim, L,
    s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_sb, s_sl, s_gb, s_gd, s_gl,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    """dx_s = sum_k w[:, k] dpre_{s+W-1-k} (same sequence only); dw, dbias accumulated atomically.
    dpre, dx: (batch, dim, L) with strides s_g*; grid (batch, dim blocks, L blocks)."""
    b = program_index(0)
    d = program_index(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = program_index(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = d < dim
    mask = mask_d[:, None] & (s < L)[None, :]
    seq_s = s  # unused without seq_idx
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b * s_sb + s * s_sl, mask=s < L, other=0)
    dpre = tl.load(dpre_ptr + b * s_gb + d[:, None] * s_gd + s[None, :] * s_gl, mask=mask, other=0.0)
    dx = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        t = s + (W - 1 - k)  # the output that read x_s through tap k
        g = tl.load(dpre_ptr + b * s_gb + d[:, None] * s_gd + t[None, :] * s_gl,
                    mask=mask_d[:, None] & (t < L)[None, :], other=0.0)
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + b * s_sb + t * s_sl, mask=t < L, other=0)
            g = tl.where((seq_t == seq_s)[None, :], g, 0.0)
        dx += wk[:, None] * g
        # Weight gradient: this tile's outputs s times the input they read through tap k.
        xk = _tap(x_ptr, init_ptr, seq_ptr, b, d, s, W - 1 - k, L, seq_s,
                  s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_sb, s_sl, mask_d, W, HAS_INIT, HAS_SEQ)
        tl.atomic_add(dw_ptr + d * W + k, tl.sum(dpre * xk, axis=1), mask=mask_d, sem="relaxed")
    tl.store(dx_ptr + b * s_gb + d[:, None] * s_gd + s[None, :] * s_gl, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, tl.sum(dpre, axis=1), mask=mask_d, sem="relaxed")


def _launch_fwd(x, weight, bias, initial_states, seq_idx, silu, out, dout=None):
    """out (and dout, read with out's strides) in x's layout."""
    batch, dim, length = x.shape
    init = initial_states if initial_states is not None else x
    seq = seq_idx if seq_idx is not None else x
    block_d, block_l = _blocks(x)
    grid = (batch, triton.cdiv(dim, block_d), triton.cdiv(length, block_l))
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, init, seq, out, dout if dout is not None else out,
        dim, length, *x.stride(), *(init.stride() if initial_states is not None else (0, 0, 0)),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)), *out.stride(),
        W=weight.shape[1], BLOCK_D=block_d, BLOCK_L=block_l, HAS_BIAS=bias is not None,
        HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, SILU=silu, GRAD=dout is not None,
    )
    return out


# torch.library custom ops (forward, backward, autograd link): one opaque node for torch.compile; eager
# calls take the same bodies through an autograd.Function (see custom_op_if_compiling).
def _conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor],
              seq_idx: Optional[Tensor], silu: bool) -> Tensor:
    return _launch_fwd(x, weight.contiguous(), bias, initial_states, seq_idx, silu, _empty_like_layout(x))


_conv_fwd_op = torch.library.custom_op("mambakit::causal_conv1d_fwd", _conv_fwd, mutates_args=())


@_conv_fwd_op.register_fake
def _(x, weight, bias, initial_states, seq_idx, silu):
    return _empty_like_layout(x)


def _conv_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor],
              seq_idx: Optional[Tensor], silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dinitial_states); empty tensors for absent inputs."""
    batch, dim, length = x.shape
    weight = weight.contiguous()
    dpre = _empty_like_layout(x, torch.float32)
    if silu:  # the kernel reads dout with dpre's strides
        if dout.stride() != dpre.stride():
            dout = _empty_like_layout(x, dout.dtype).copy_(dout)
        _launch_fwd(x, weight, bias, initial_states, seq_idx, True, dpre, dout)
    else:
        dpre.copy_(dout)
    dx = _empty_like_layout(x)
    dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    dbias = torch.zeros(dim, device=x.device, dtype=torch.float32) if bias is not None else None
    init = initial_states if initial_states is not None else x
    seq = seq_idx if seq_idx is not None else x
    block_d, block_l = _blocks(x)
    grid = (batch, triton.cdiv(dim, block_d), triton.cdiv(length, block_l))
    _conv_bwd_kernel[grid](
        x, weight, init, seq, dpre, dx, dw, dbias if dbias is not None else dw, dim, length,
        *x.stride(), *(init.stride() if initial_states is not None else (0, 0, 0)),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)), *dpre.stride(),
        W=weight.shape[1], BLOCK_D=block_d, BLOCK_L=block_l, HAS_BIAS=bias is not None,
        HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
    )
    dinit = x.new_empty(0)
    if initial_states is not None:
        dinit = _initial_states_grad(dpre, weight, seq_idx).to(initial_states.dtype)
    return dx, dw.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else x.new_empty(0), dinit


_conv_bwd_op = torch.library.custom_op("mambakit::causal_conv1d_bwd", _conv_bwd, mutates_args=())


@_conv_bwd_op.register_fake
def _(dout, x, weight, bias, initial_states, seq_idx, silu):
    absent = x.new_empty(0)
    return (_empty_like_layout(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape) if bias is not None
            else absent, initial_states.new_empty(initial_states.shape) if initial_states is not None else x.new_empty(0))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, initial_states, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
    ctx.silu = silu


def _conv_grads(ctx, dout, backward=_conv_bwd_op):
    x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
    dx, dw, dbias, dinit = backward(dout, x, weight, bias, initial_states, seq_idx, ctx.silu)
    return (dx, dw, dbias if bias is not None else None, dinit if initial_states is not None else None, None, None)


_conv_fwd_op.register_autograd(_conv_grads, setup_context=_conv_setup_context)
_conv_fwd_eager = eager_autograd(_conv_fwd, _conv_setup_context, functools.partial(_conv_grads, backward=_conv_bwd))


def _initial_states_grad(dpre, weight, seq_idx):
    """d initial_states[:, :, j] = sum_k w[:, k] dpre_{j-k} over outputs t = j-k >= 0 of the first sequence."""
    batch, dim, length = dpre.shape
    width = weight.shape[1]
    dinit = dpre.new_zeros(batch, dim, width - 1)
    first = None if seq_idx is None else (seq_idx == seq_idx[:, :1]).float()  # (batch, L)
    for j in range(width - 1):
        for k in range(j + 1):
            t = j - k
            if t < length:
                g = dpre[:, :, t] if first is None else dpre[:, :, t] * first[:, t, None]
                dinit[:, :, j] += weight[:, k].float() * g
    return dinit


def _final_states(x, initial_states, seq_idx, width):
    """The last width-1 inputs (history included), zero where they are not of the last sequence."""
    batch, dim, length = x.shape
    if width == 1:
        return x.new_zeros(batch, dim, 0)
    history = x.new_zeros(batch, dim, width - 1) if initial_states is None else initial_states.to(x.dtype)
    tail = torch.cat([history, x[..., max(0, length - (width - 1)):]], dim=-1)[..., -(width - 1):]
    if seq_idx is not None:
        tail_idx = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)[:, -(width - 1):]
        tail = tail * (tail_idx == seq_idx[:, -1:]).unsqueeze(1).to(tail.dtype)
    return tail


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                  activation=None):
    """Triton causal conv; arguments and shapes as `mambakit.ops.causal_conv1d` (validated there).

    fp64 inputs go to the reference (the kernels accumulate in fp32).
    """
    if any(t is not None and t.dtype == torch.float64 for t in (x, weight, bias, initial_states)):
        return reference.causal_conv1d(x, weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                                       return_final_states=return_final_states, activation=activation)
    bias = bias.contiguous() if bias is not None else None  # indexed with unit stride
    conv = custom_op_if_compiling(_conv_fwd_op, _conv_fwd_eager)
    out = conv(x, weight, bias, initial_states, seq_idx, activation is not None)
    if not return_final_states:
        return out
    return out, _final_states(x, initial_states, seq_idx, weight.shape[1])
