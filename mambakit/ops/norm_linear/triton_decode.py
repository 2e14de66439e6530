"""RMSNorm (with the residual add, or gated) fused into the linear layer after it, for decode steps: a
few rows, where the norm's own launch and its round trip through memory cost as much as the norm.

A program computes BLOCK_N outputs of one row: per normalization group it sums the squares of s = x
(+ residual) (* silu(z) when the gate comes first), then (in one chunk when the group fits, else
walking the group's channels in chunks) normalizes them (the norm's output rounded to x's dtype, as the
unfused norm stores it), and accumulates their dot products with BLOCK_N rows of the weight in fp32.
The summed residual is stored by the first program of each row. A conv decode step (`ConvStep`) on some
output columns runs as the epilogue: each program owns its columns, so it updates their windows alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops._common import custom_op_if_compiling, overlap
from mambakit.ops._triton import program_index, wait_for_inputs
from mambakit.ops.conv1d.triton_step import conv_step_channels

BLOCK_K = 512  # channels per chunk when a group is longer than MAX_ONE_CHUNK
MAX_ONE_CHUNK = 4096  # channels of a group held at once
TILE_ELEMENTS = 16384  # weight elements per program at once (BLOCK_N x BLOCK_K)
MIN_PROGRAMS = 256  # about two per SM of an H100/H200


@triton.jit
def _norm_linear_kernel(
    x_ptr, res_ptr, z_ptr, nw_ptr, w_ptr, out_ptr, res_out_ptr, cs_ptr, cw_ptr, cb_ptr, N, group_size, eps,
    conv_offset, conv_dim, s_x, s_r, s_z, s_o, s_ro, s_w, s_cb, s_cd, s_cw,
    GROUPS: tl.constexpr, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, GATE_FIRST: tl.constexpr,
    STORE_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
    HAS_CONV: tl.constexpr, CONV_W: tl.constexpr, CONV_W_P2: tl.constexpr, CONV_BIAS: tl.constexpr,
    CONV_SILU: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), rows). out[m, n] = sum_k w[n, k] norm(s[m])[k]. ONE_CHUNK: a group fits in
    BLOCK_K channels, so s and the weight tile are loaded once (the weight first: its load is the long one, and
    under PDL it overlaps the kernel before). NORM=False: a plain linear layer, out = x w^T."""
    pid_n = program_index(0)
    m = program_index(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    tl.static_assert(NORM or ONE_CHUNK, "a linear layer without norm is one chunk")
    for g in range(GROUPS):
        if ONE_CHUNK:
            k = g * group_size + tl.arange(0, BLOCK_K)
            mask_k = tl.arange(0, BLOCK_K) < group_size
            w = tl.load(w_ptr + n[:, None] * s_w + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            wait_for_inputs(PDL)
            s = _summed(x_ptr, res_ptr, z_ptr, m, k, mask_k, s_x, s_r, s_z, HAS_RES, HAS_Z, GATE_FIRST)
            if STORE_RES:
                if pid_n == 0:
                    tl.store(res_out_ptr + m * s_ro + k, s.to(res_out_ptr.dtype.element_ty), mask=mask_k)
            if NORM:
                rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / group_size + eps)
                s = _normalized(s, rstd, nw_ptr, z_ptr, m, k, mask_k, s_z, HAS_Z, GATE_FIRST, x_ptr)
            acc += tl.sum(w.to(tl.float32) * s[None, :], axis=1)
        else:
            wait_for_inputs(PDL)
            sumsq = tl.zeros((BLOCK_K,), tl.float32)
            for k0 in range(0, group_size, BLOCK_K):
                k = g * group_size + k0 + tl.arange(0, BLOCK_K)
                mask_k = k0 + tl.arange(0, BLOCK_K) < group_size
                s = _summed(x_ptr, res_ptr, z_ptr, m, k, mask_k, s_x, s_r, s_z, HAS_RES, HAS_Z, GATE_FIRST)
                sumsq += s * s
                if STORE_RES:
                    if pid_n == 0:
                        tl.store(res_out_ptr + m * s_ro + k, s.to(res_out_ptr.dtype.element_ty), mask=mask_k)
            rstd = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / group_size + eps)
            for k0 in range(0, group_size, BLOCK_K):
                k = g * group_size + k0 + tl.arange(0, BLOCK_K)
                mask_k = k0 + tl.arange(0, BLOCK_K) < group_size
                s = _summed(x_ptr, res_ptr, z_ptr, m, k, mask_k, s_x, s_r, s_z, HAS_RES, HAS_Z, GATE_FIRST)
                normed = _normalized(s, rstd, nw_ptr, z_ptr, m, k, mask_k, s_z, HAS_Z, GATE_FIRST, x_ptr)
                w = tl.load(w_ptr + n[:, None] * s_w + k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                            other=0.0)
                acc += tl.sum(w.to(tl.float32) * normed[None, :], axis=1)
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_CONV:  # the conv sees the output rounded to its dtype, as when it runs after the linear layer
        c = n - conv_offset
        in_conv = mask_n & (c >= 0) & (c < conv_dim)
        conv = conv_step_channels(out, cs_ptr + m * s_cb + c * s_cd, s_cw, cw_ptr + c * CONV_W, cb_ptr + c,
                                  in_conv, CONV_W, CONV_W_P2, CONV_BIAS, CONV_SILU)
        out = tl.where(in_conv, conv.to(out.dtype), out)
    tl.store(out_ptr + m * s_o + n, out, mask=mask_n)


@triton.jit
def _normalized(s, rstd, nw_ptr, z_ptr, m, k, mask_k, s_z, HAS_Z: tl.constexpr, GATE_FIRST: tl.constexpr, x_ptr):
    """The norm's output at channels k, rounded to x's dtype as the unfused norm stores it, in fp32."""
    normed = s * rstd * tl.load(nw_ptr + k, mask=mask_k, other=0.0).to(tl.float32)
    if HAS_Z and not GATE_FIRST:
        zv = tl.load(z_ptr + m * s_z + k, mask=mask_k, other=0.0).to(tl.float32)
        normed *= zv * tl.sigmoid(zv)
    return normed.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _summed(x_ptr, res_ptr, z_ptr, m, k, mask_k, s_x, s_r, s_z, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr,
            GATE_FIRST: tl.constexpr):
    """s = x (+ residual) (* silu(z) when the gate comes first) at channels k of row m, in fp32."""
    s = tl.load(x_ptr + m * s_x + k, mask=mask_k, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + m * s_r + k, mask=mask_k, other=0.0).to(tl.float32)
    if HAS_Z and GATE_FIRST:
        zv = tl.load(z_ptr + m * s_z + k, mask=mask_k, other=0.0).to(tl.float32)
        s *= zv * tl.sigmoid(zv)
    return s


def launch_config(group_size: int, N: int) -> dict:
    """Tile and warps, from an H200 sweep at the 130M and 1.4B decode shapes (benchmarks/norm_linear_sweep.py):
    a whole group in one chunk beats chunks of 256 or 512 at every shape; the tile is kept at TILE_ELEMENTS
    (registers), longer groups walk in chunks of BLOCK_K; fewer outputs per program for narrow layers, so that
    at least MIN_PROGRAMS programs share the weight read."""
    block_k = triton.next_power_of_2(group_size)
    if block_k > MAX_ONE_CHUNK:
        return dict(BLOCK_N=4, BLOCK_K=BLOCK_K, num_warps=4)
    narrow = 1 << max(N // MIN_PROGRAMS, 1).bit_length() - 1  # the power of two at most N / MIN_PROGRAMS
    return dict(BLOCK_N=min(8, TILE_ELEMENTS // block_k, narrow), BLOCK_K=block_k, num_warps=4)


def _norm_linear(x: Tensor, residual: Optional[Tensor], z: Optional[Tensor], norm_weight: Optional[Tensor],
                 weight: Tensor,
                 eps: float, group_size: int, gate_first: bool, residual_dtype: Optional[torch.dtype],
                 conv_state: Optional[Tensor], conv_weight: Optional[Tensor], conv_bias: Optional[Tensor],
                 conv_offset: int, conv_silu: bool) -> tuple[Tensor, Tensor]:
    """(out (rows, N) in x's dtype, summed residual (rows, K) in residual_dtype, or empty when None); with
    conv_state, the conv step on out's columns conv_offset.. (conv_state updated in place). norm_weight None:
    no norm (a plain linear layer: one group of at most MAX_ONE_CHUNK channels)."""
    rows, K = x.shape
    N = weight.shape[0]
    out = torch.empty(rows, N, device=x.device, dtype=x.dtype)
    res_out = (torch.empty(rows, K, device=x.device, dtype=residual_dtype) if residual_dtype is not None
               else torch.empty(0, device=x.device))
    none = x  # never read: its flag is off
    conv_dim, conv_width = conv_weight.shape if conv_state is not None else (0, 1)
    config = launch_config(group_size, N)
    pdl = overlap(x.device)
    _norm_linear_kernel[(triton.cdiv(N, config["BLOCK_N"]), rows)](
        x, residual if residual is not None else none, z if z is not None else none,
        norm_weight if norm_weight is not None else none, weight, out,
        res_out, *(t if t is not None else none for t in (conv_state, conv_weight, conv_bias)),
        N, group_size, eps, conv_offset, conv_dim, x.stride(0), residual.stride(0) if residual is not None else 0,
        z.stride(0) if z is not None else 0, out.stride(0), res_out.stride(0) if residual_dtype is not None else 0,
        weight.stride(0), *(conv_state.stride() if conv_state is not None else (0, 0, 0)),
        GROUPS=K // group_size, HAS_RES=residual is not None, HAS_Z=z is not None,
        GATE_FIRST=gate_first, STORE_RES=residual_dtype is not None,
        ONE_CHUNK=config["BLOCK_K"] >= group_size, HAS_CONV=conv_state is not None, CONV_W=conv_width,
        CONV_W_P2=triton.next_power_of_2(conv_width), CONV_BIAS=conv_bias is not None, CONV_SILU=conv_silu,
        PDL=pdl, launch_pdl=pdl, NORM=norm_weight is not None, **config)
    return out, res_out


_norm_linear_op = torch.library.custom_op("mambakit::norm_linear", _norm_linear, mutates_args=("conv_state",))


@_norm_linear_op.register_fake
def _(x, residual, z, norm_weight, weight, eps, group_size, gate_first, residual_dtype, conv_state, conv_weight,
      conv_bias, conv_offset, conv_silu):
    rows, K = x.shape
    res_out = x.new_empty(rows, K, dtype=residual_dtype) if residual_dtype is not None else x.new_empty(0)
    return x.new_empty(rows, weight.shape[0]), res_out


def norm_linear(x, residual, z, norm_weight, weight, eps, group_size, gate_first, residual_dtype, conv=None):
    """The launch (inputs validated by `mambakit.ops.norm_linear`): x, residual, z (rows, K) with unit
    stride along K; weight (N, K) contiguous; norm_weight (K,) or None (no norm); conv a `ConvStep` or None.
    Returns (out, summed residual or an empty tensor)."""
    run = custom_op_if_compiling(_norm_linear_op, _norm_linear)
    conv_args = ((conv.state, conv.weight.contiguous(), None if conv.bias is None else conv.bias.contiguous(),
                  conv.offset, conv.activation is not None) if conv is not None else (None, None, None, 0, False))
    return run(x, residual, z, norm_weight, weight, float(eps), int(group_size), bool(gate_first), residual_dtype,
               *conv_args)
