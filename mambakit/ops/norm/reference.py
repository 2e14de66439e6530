"""RMSNorm, fused residual add + RMSNorm and gated RMSNorm in plain PyTorch (math in fp32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension, times weight (x's last dimension) if given.

    torch's own op: one call instead of five (a decode step runs a few per layer and token)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def prenorm_residual_dtype(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    """The dtype of the sum x + residual that `rms_norm(prenorm=True)` returns: residual's (x's when None),
    at least fp32 when residual_in_fp32 (fp64 stays fp64)."""
    dtype = x.dtype if residual is None else residual.dtype
    return torch.promote_types(dtype, torch.float32) if residual_in_fp32 else dtype


def rms_norm(x, weight, eps=1e-5, residual=None, prenorm=False, residual_in_fp32=False):
    """Reference for `mambakit.ops.rms_norm` (validated there): normalizes s = x + residual, in fp32."""
    dtype = compute_dtype(x)
    summed = x.to(dtype) if residual is None else residual.to(dtype) + x  # the sum promotes x to `dtype`
    out = normalize(summed, eps, weight.to(dtype)).to(x.dtype)
    if not prenorm:
        return out
    return out, summed.to(prenorm_residual_dtype(x, residual, residual_in_fp32))


def rms_norm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Reference for `mambakit.ops.rms_norm_gated` (validated there)."""
    dtype = compute_dtype(x)
    x32 = x.to(dtype)
    gate = None if z is None else F.silu(z.to(dtype))
    if gate is not None and not norm_before_gate:
        x32 = x32 * gate
    group_size = x.shape[-1] if group_size is None else group_size
    out = normalize(x32.unflatten(-1, (-1, group_size)), eps).flatten(-2) * weight.to(dtype)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
