"""One decoding step of the selective scan as a Triton kernel: the state is read, updated and written
back once, in place, with the output computed on the way (the official `selective_state_update`)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops._common import custom_op_if_compiling, overlap
from mambakit.ops._triton import program_index, wait_for_inputs
from mambakit.ops.selective_scan import step

BLOCK_D = 32


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, w_ptr, out_ptr,
    dim, rank, b_per_group, c_per_group, s_sb, s_sd, s_sn, s_xb, s_xd, s_tb, s_td, s_zb, s_zd, s_ob,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_Ad, s_An, s_wd, s_wr,
    N: tl.constexpr, N_P2: tl.constexpr, BLOCK_D: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, A_IS_LOG: tl.constexpr, DT_PROJ: tl.constexpr,
    R_P2: tl.constexpr, PDL: tl.constexpr,
):
    """state (batch, dim, N) <- exp(dt A) state + dt B x; out = (C.state + D x) silu(z). Grid (batch, dim blocks).
    A_IS_LOG: A holds A_log (A = -exp). DT_PROJ: dt holds (batch, rank) and dt = W dt with W (dim, rank)."""
    b = program_index(0)
    d = program_index(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, N_P2)
    mask_d = d < dim
    mask = mask_d[:, None] & (n < N)[None, :]
    # Weights, then the state (only decode steps write it, and the kernel before is never one): under PDL
    # these loads overlap that kernel.
    A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=mask, other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    if DT_PROJ:
        r = tl.arange(0, R_P2)
        w = tl.load(w_ptr + d[:, None] * s_wd + r[None, :] * s_wr, mask=mask_d[:, None] & (r < rank)[None, :],
                    other=0.0).to(tl.float32)
    state_ptrs = state_ptr + b * s_sb + d[:, None] * s_sd + n[None, :] * s_sn
    h = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    x = tl.load(x_ptr + b * s_xb + d * s_xd, mask=mask_d, other=0.0).to(tl.float32)
    if DT_PROJ:
        low = tl.load(dt_ptr + b * s_tb + r * s_td, mask=r < rank, other=0.0).to(tl.float32)
        dt = tl.sum(w * low[None, :], axis=1)
    else:
        dt = tl.load(dt_ptr + b * s_tb + d * s_td, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    Bv = tl.load(B_ptr + b * s_Bb + (d // b_per_group)[:, None] * s_Bg + n[None, :] * s_Bn, mask=mask, other=0.0)
    Cv = tl.load(C_ptr + b * s_Cb + (d // c_per_group)[:, None] * s_Cg + n[None, :] * s_Cn, mask=mask, other=0.0)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv.to(tl.float32)
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(h * Cv.to(tl.float32), axis=1)  # from the fp32 state: a half one is rounded for storage only
    if HAS_D:
        y += tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + d * s_zd, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + b * s_ob + d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def _state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, A_is_log: bool,
                  dt_proj_weight: Optional[Tensor]) -> Tensor:
    """The kernel launch (in place on state); registered as a custom op so that torch.compile keeps it whole.
    A holds A_log when A_is_log; dt is (batch, R) when dt_proj_weight (dim, R) is given."""
    B3 = B if B.dim() == 3 else B.unsqueeze(1)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    batch, dim, N = state.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dummy = out
    rank = dt_proj_weight.shape[1] if dt_proj_weight is not None else 1
    pdl = overlap(state.device)
    _state_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        state, x, dt, A, B3, C3, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, dt_proj_weight if dt_proj_weight is not None else dummy, out,
        dim, rank, dim // B3.shape[1], dim // C3.shape[1], *state.stride(), *x.stride(), *dt.stride(),
        *(z.stride() if z is not None else (0, 0)), out.stride(0), *B3.stride(), *C3.stride(), *A.stride(),
        *(dt_proj_weight.stride() if dt_proj_weight is not None else (0, 0)),
        N=N, N_P2=triton.next_power_of_2(N), BLOCK_D=BLOCK_D, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, A_IS_LOG=A_is_log, DT_PROJ=dt_proj_weight is not None,
        R_P2=triton.next_power_of_2(rank), PDL=pdl, launch_pdl=pdl,
    )
    return out


_state_update_op = torch.library.custom_op("mambakit::selective_state_update", _state_update,
                                           mutates_args=("state",))


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log, dt_proj_weight):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, A_log=None,
                           dt_proj_weight=None):
    """Triton decode step; arguments as `mambakit.ops.selective_state_update` (validated there).

    Inputs may be strided views; an fp64 state or input goes to the reference.
    """
    if any(t is not None and t.dtype == torch.float64
           for t in (state, x, dt, A, A_log, B, C, D, z, dt_bias, dt_proj_weight)):
        return step.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                           A_log=A_log, dt_proj_weight=dt_proj_weight)
    D = D.contiguous() if D is not None else None  # indexed with unit stride
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    update = custom_op_if_compiling(_state_update_op, _state_update)
    return update(state, x, dt, A if A_log is None else A_log, B, C, D, z, dt_bias, dt_softplus, A_log is not None,
                  dt_proj_weight)
