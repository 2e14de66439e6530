"""RMSNorm, fused residual add + RMSNorm and gated RMSNorm as Triton kernels with their autograd.

One kernel pair serves all three: a "row" is one normalization group (a whole hidden vector, or one
group of `group_size` channels of it), held in registers. s = x (+ residual) (* silu(z) when the gate
comes first); out = s / rms(s) * weight (* silu(z) when the gate comes after). The backward recomputes
from the saved inputs and the per-row 1/rms; weight gradients are summed per program, then atomically.
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
from mambakit.ops.norm import reference


@triton.jit
def _norm_fwd_kernel(
    x_ptr, res_ptr, z_ptr, w_ptr, out_ptr, res_out_ptr, rstd_ptr, rows, groups, group_size, eps,
    s_x, s_r, s_z, s_o, s_ro,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, GATE_FIRST: tl.constexpr,
    STORE_RES: tl.constexpr,
):
    """Rows r = (m, g): channels g*group_size + [0, group_size) of row m. Grid (rows,)."""
    r = program_index(0)
    m = r // groups
    c = (r % groups) * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    s = tl.load(x_ptr + m * s_x + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + m * s_r + c, mask=mask, other=0.0).to(tl.float32)
    if STORE_RES:
        tl.store(res_out_ptr + m * s_ro + c, s.to(res_out_ptr.dtype.element_ty), mask=mask)
    if HAS_Z:
        z = tl.load(z_ptr + m * s_z + c, mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if GATE_FIRST:
            s *= gate
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / group_size + eps)
    tl.store(rstd_ptr + r, rstd)
    out = s * rstd * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z and not GATE_FIRST:
        out *= gate
    tl.store(out_ptr + m * s_o + c, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    x_ptr, res_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dres_out_ptr, dx_ptr, dz_ptr, dw_ptr,
    rows, groups, group_size, hidden,
    s_x, s_r, s_z, s_g, s_gr, s_dx, s_dz,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, GATE_FIRST: tl.constexpr,
    HAS_DRES: tl.constexpr,
):
    """Programs stride over rows by a multiple of `groups`, so each program stays on one group g and
    sums its weight gradient in registers. dx is the gradient of s before the gate (x's and residual's)."""
    pid = program_index(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < group_size
    c = (pid % groups) * group_size + cols
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), tl.float32)
    for r in range(pid, rows, tl.num_programs(0)):
        m = r // groups
        s = tl.load(x_ptr + m * s_x + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(res_ptr + m * s_r + c, mask=mask, other=0.0).to(tl.float32)
        x_in = s
        dout = tl.load(dout_ptr + m * s_g + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + m * s_z + c, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            dgate_dz = sig * (1.0 + z * (1.0 - sig))
            if GATE_FIRST:
                s *= gate
        rstd = tl.load(rstd_ptr + r)
        xhat = s * rstd
        if HAS_Z and not GATE_FIRST:
            tl.store(dz_ptr + m * s_dz + c, (dout * xhat * w * dgate_dz).to(dz_ptr.dtype.element_ty), mask=mask)
            dout *= gate
        dw_acc += dout * xhat
        dxhat = dout * w
        ds = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / group_size))
        if HAS_Z and GATE_FIRST:
            tl.store(dz_ptr + m * s_dz + c, (ds * x_in * dgate_dz).to(dz_ptr.dtype.element_ty), mask=mask)
            ds *= gate
        if HAS_DRES:
            ds += tl.load(dres_out_ptr + m * s_gr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + m * s_dx + c, ds.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(dw_ptr + c, dw_acc, mask=mask, sem="relaxed")


def _rows(t: torch.Tensor | None, hidden: int) -> torch.Tensor | None:
    """(..., hidden) -> (M, hidden) with unit stride along hidden (a view when possible)."""
    if t is None:
        return None
    t = t.reshape(-1, hidden)
    return t if t.stride(-1) == 1 else t.contiguous()


# torch.library custom ops (forward, backward, autograd link): one opaque node for torch.compile; eager
# calls take the same bodies through an autograd.Function (see custom_op_if_compiling).
def _norm_fwd(x: Tensor, residual: Optional[Tensor], z: Optional[Tensor], weight: Tensor, eps: float,
              group_size: int, gate_first: bool, store_res: bool,
              res_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(out, s = x + residual in res_dtype or an empty tensor unless store_res, 1/rms per normalized group)."""
    hidden = x.shape[-1]
    x2, r2, z2 = _rows(x, hidden), _rows(residual, hidden), _rows(z, hidden)
    groups = hidden // group_size
    rows = x2.shape[0] * groups
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    res_out = torch.empty(x2.shape, device=x.device, dtype=res_dtype) if store_res else out
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    _norm_fwd_kernel[(rows,)](
        x2, r2 if r2 is not None else x2, z2 if z2 is not None else x2, weight, out, res_out, rstd,
        rows, groups, group_size, eps, x2.stride(0), r2.stride(0) if r2 is not None else 0,
        z2.stride(0) if z2 is not None else 0, out.stride(0), res_out.stride(0),
        BLOCK=triton.next_power_of_2(group_size), HAS_RES=r2 is not None, HAS_Z=z2 is not None,
        GATE_FIRST=gate_first, STORE_RES=store_res, num_warps=_warps(group_size),
    )
    return out.view(x.shape), res_out.view(x.shape) if store_res else x.new_empty(0), rstd


_norm_fwd_op = torch.library.custom_op("mambakit::rms_norm_fwd", _norm_fwd, mutates_args=())


@_norm_fwd_op.register_fake
def _(x, residual, z, weight, eps, group_size, gate_first, store_res, res_dtype):
    rows = x.numel() // group_size
    # Contiguous like the real outputs, whatever x's strides.
    return (x.new_empty(x.shape), x.new_empty(x.shape if store_res else (0,), dtype=res_dtype),
            x.new_empty(rows, dtype=torch.float32))


def _norm_bwd(dout: Tensor, dres_out: Optional[Tensor], x: Tensor, residual: Optional[Tensor], z: Optional[Tensor],
              weight: Tensor, rstd: Tensor, group_size: int,
              gate_first: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dz, dweight); empty tensors for absent inputs."""
    hidden = x.shape[-1]
    x2, r2, z2 = _rows(x, hidden), _rows(residual, hidden), _rows(z, hidden)
    groups = hidden // group_size
    rows = x2.shape[0] * groups
    dout = _rows(dout, hidden)
    dres_out = _rows(dres_out, hidden)
    ds = torch.empty(x2.shape, device=x.device, dtype=torch.float32 if r2 is not None else x.dtype)
    dz = torch.empty(z2.shape, device=x.device, dtype=z.dtype) if z2 is not None else None
    dw = torch.zeros(hidden, device=x.device, dtype=torch.float32)
    programs = min(rows, groups * max(1, 4 * _sm_count(x.device) // groups))  # a multiple of groups
    _norm_bwd_kernel[(programs,)](
        x2, r2 if r2 is not None else x2, z2 if z2 is not None else x2, weight, rstd, dout,
        dres_out if dres_out is not None else dout, ds, dz if dz is not None else ds, dw,
        rows, groups, group_size, hidden, x2.stride(0), r2.stride(0) if r2 is not None else 0,
        z2.stride(0) if z2 is not None else 0, dout.stride(0), dres_out.stride(0) if dres_out is not None else 0,
        ds.stride(0), dz.stride(0) if dz is not None else 0,
        BLOCK=triton.next_power_of_2(group_size), HAS_RES=r2 is not None, HAS_Z=z2 is not None,
        GATE_FIRST=gate_first, HAS_DRES=dres_out is not None, num_warps=_warps(group_size),
    )
    absent = x.new_empty(0)
    return (ds.to(x.dtype).view(x.shape), ds.to(residual.dtype, copy=True).view(x.shape) if r2 is not None else absent,
            dz.view(x.shape) if dz is not None else x.new_empty(0), dw.to(weight.dtype))


_norm_bwd_op = torch.library.custom_op("mambakit::rms_norm_bwd", _norm_bwd, mutates_args=())


@_norm_bwd_op.register_fake
def _(dout, dres_out, x, residual, z, weight, rstd, group_size, gate_first):
    # Contiguous like the real gradients, whatever the inputs' strides.
    return (x.new_empty(x.shape), residual.new_empty(x.shape) if residual is not None else x.new_empty(0),
            z.new_empty(x.shape) if z is not None else x.new_empty(0), weight.new_empty(weight.shape))


def _norm_setup_context(ctx, inputs, output):
    x, residual, z, weight, eps, group_size, gate_first, store_res, res_dtype = inputs
    ctx.save_for_backward(x, residual, z, weight, output[2])
    ctx.group_size, ctx.gate_first, ctx.store_res = group_size, gate_first, store_res


def _norm_grads(ctx, dout, dres_out, _drstd, backward=_norm_bwd_op):
    x, residual, z, weight, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    dx, dres, dz, dw = backward(dout, dres_out if ctx.store_res else None, x, residual, z, weight, rstd,
                                ctx.group_size, ctx.gate_first)
    return (dx, dres if residual is not None else None, dz if z is not None else None, dw,
            None, None, None, None, None)


_norm_fwd_op.register_autograd(_norm_grads, setup_context=_norm_setup_context)
_norm_fwd_eager = eager_autograd(_norm_fwd, _norm_setup_context, functools.partial(_norm_grads, backward=_norm_bwd))


def _norm_forward(*args):
    """`_norm_fwd_op`'s results: the custom op under torch.compile, its eager twin otherwise."""
    return custom_op_if_compiling(_norm_fwd_op, _norm_fwd_eager)(*args)


def _warps(group_size: int) -> int:
    return min(16, max(1, triton.next_power_of_2(group_size) // 256))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _uses_reference(*tensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def rms_norm(x, weight, eps=1e-5, residual=None, prenorm=False, residual_in_fp32=False):
    """Triton RMSNorm (+ residual); arguments as `mambakit.ops.rms_norm` (validated there). fp64 -> reference."""
    if _uses_reference(x, weight, residual):
        return reference.rms_norm(x, weight, eps=eps, residual=residual, prenorm=prenorm,
                                  residual_in_fp32=residual_in_fp32)
    res_dtype = reference.prenorm_residual_dtype(x, residual, residual_in_fp32)
    out, summed, _ = _norm_forward(x, residual, None, weight.contiguous(), eps, x.shape[-1], False, prenorm,
                                   res_dtype)
    return (out, summed) if prenorm else out


def rms_norm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Triton gated RMSNorm; arguments as `mambakit.ops.rms_norm_gated` (validated there). fp64 -> reference."""
    if _uses_reference(x, weight, z):
        return reference.rms_norm_gated(x, weight, z=z, eps=eps, group_size=group_size,
                                        norm_before_gate=norm_before_gate)
    group_size = x.shape[-1] if group_size is None else group_size
    gate_first = z is not None and not norm_before_gate
    out, _, _ = _norm_forward(x, None, z, weight.contiguous(), eps, group_size, gate_first, False, x.dtype)
    return out
