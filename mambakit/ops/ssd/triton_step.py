"""Triton decode step of Mamba-2 SSD: one token, state updated in place.

One program per (batch, head, block of headdim rows) reads its state tile once, writes it once,
and never synchronizes with the host, so the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops._common import custom_op_if_compiling, overlap
from mambakit.ops._triton import program_index, wait_for_inputs

from .reference import DEFAULT_DT_LIMIT

BLOCK_P = 16  # headdim rows per program: 24 heads x 64 at batch 1 is still 96 programs


@triton.jit
def _ssd_step(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
              H, G, P, N, dt_min, dt_max, s_xb, s_xh, s_xp, s_tb, s_th, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
              s_zb, s_zh, s_zp,
              HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
              SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, A_IS_LOG: tl.constexpr, BP: tl.constexpr,
              BN: tl.constexpr, PDL: tl.constexpr):
    b = program_index(0)
    h = program_index(1)
    g = h // (H // G)
    rows = program_index(2) * BP + tl.arange(0, BP)
    cols = tl.arange(0, BN)
    mrow, mcol = rows < P, cols < N
    A = tl.load(A_ptr + h).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    tile = state_ptr + ((b * H + h) * P + rows[:, None]) * N + cols[None, :]
    mask = mrow[:, None] & mcol[None, :]
    # Only decode steps write the state, and the kernel before is never one: under PDL its load overlaps that kernel.
    s = tl.load(tile, mask=mask, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    dt = tl.load(dt_ptr + b * s_tb + h * s_th).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    decay = tl.exp(dt * A)
    x = tl.load(x_ptr + b * s_xb + h * s_xh + rows * s_xp, mask=mrow, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_Bb + g * s_Bg + cols * s_Bn, mask=mcol, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_Cb + g * s_Cg + cols * s_Cn, mask=mcol, other=0.0).to(tl.float32)
    s = s * decay + (dt * x)[:, None] * Bv[None, :]
    tl.store(tile, s.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(s * Cv[None, :], axis=1)  # from the fp32 state: a half one is rounded for storage only
    if HAS_D:
        if D_PER_CHANNEL:
            y += x * tl.load(D_ptr + h * P + rows, mask=mrow, other=0.0).to(tl.float32)
        else:
            y += x * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + b * s_zb + h * s_zh + rows * s_zp, mask=mrow, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(out_ptr + (b * H + h) * P + rows, y, mask=mrow)


def _ssd_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, dt_min: float, dt_max: float,
                A_is_log: bool) -> Tensor:
    """The kernel launch (in place on state); a custom op so that torch.compile keeps it whole.
    A holds A_log when A_is_log; dt_min > 0 or dt_max < inf clamps dt."""
    batch, H, P, N = state.shape
    G = B.shape[1]
    none = state.new_empty(0)
    has_limit = (dt_min, dt_max) != DEFAULT_DT_LIMIT
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    pdl = overlap(state.device)
    _ssd_step[(batch, H, triton.cdiv(P, BLOCK_P))](
        state, x, dt, A.contiguous(), B, C, D.contiguous() if D is not None else none,
        z if z is not None else none, dt_bias.contiguous() if dt_bias is not None else none, out, H, G, P, N,
        dt_min if has_limit else 0.0, min(dt_max, 3.0e38) if has_limit else 0.0,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *(z.stride() if z is not None else (0, 0, 0)),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit, A_IS_LOG=A_is_log,
        BP=BLOCK_P, BN=max(16, triton.next_power_of_2(N)), PDL=pdl, launch_pdl=pdl, num_warps=4)
    return out


_ssd_update_op = torch.library.custom_op("mambakit::ssd_state_update", _ssd_update, mutates_args=("state",))


@_ssd_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, A_is_log):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=DEFAULT_DT_LIMIT, A_log=None):
    """One decode step; arguments checked by `mambakit.ops.ssd.ssd_state_update`.

    state: (batch, nheads, headdim, N) fp32, bf16 or fp16, contiguous, updated in place (fp32 math);
    x, z: (batch, nheads, headdim);
    dt: (batch, nheads); A or A_log: (nheads,); B, C: (batch, ngroups, N); any strides (views of one
    in_proj output are read in place). Returns out (batch, nheads, headdim) contiguous, in x's dtype.
    """
    if state.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"state: the triton step takes a float32, bfloat16 or float16 state, got {state.dtype}")
    update = custom_op_if_compiling(_ssd_update_op, _ssd_update)
    return update(state, x, dt, A if A_log is None else A_log, B, C, D, z, dt_bias, bool(dt_softplus),
                  float(dt_limit[0]), float(dt_limit[1]), A_log is not None)
