"""RMSNorm (optionally fused with the residual add) and gated RMSNorm: functions, checks, dispatch, modules.

Every path has the signature of the public function without `backend` and receives validated inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from mambakit.ops._common import FLOAT_DTYPES, check_dtype, check_same_device, check_shape, dispatch
from mambakit.ops.norm import reference


def _triton_norm():
    """The Triton path, imported only once chosen (an import statement: torch.compile traces it)."""
    from mambakit.ops.norm import triton_norm

    return triton_norm


_IMPLS = {
    "reference": lambda: reference.rms_norm,
    "triton": lambda: _triton_norm().rms_norm,
}
_GATED_IMPLS = {
    "reference": lambda: reference.rms_norm_gated,
    "triton": lambda: _triton_norm().rms_norm_gated,
}


def check_like(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    """`t` must have exactly x's shape (no broadcasting) and a float dtype."""
    check_shape(name, t, *x.shape)
    check_dtype(name, t, FLOAT_DTYPES)


def check_norm_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"x: expected a tensor (..., hidden), got {x!r:.80}")
    check_dtype("x", x, FLOAT_DTYPES)
    check_shape("weight", weight, x.shape[-1])
    check_dtype("weight", weight, FLOAT_DTYPES)


def rms_norm(x, weight, eps=1e-5, residual=None, prenorm=False, residual_in_fp32=False, backend=None):
    """RMSNorm of s = x (+ residual): s / sqrt(mean(s^2) + eps) * weight, computed in fp32.

    x, residual: (..., hidden); weight: (hidden,). Returns out in x's dtype; with prenorm=True returns
    (out, s) where s is in residual's dtype (x's when no residual), fp32 when residual_in_fp32.
    """
    check_norm_inputs(x, weight)
    check_like("residual", residual, x)
    check_same_device(x=x, weight=weight, residual=residual)
    norm = dispatch(_IMPLS, backend, x)
    return norm(x, weight, eps=eps, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)


def rms_norm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True, backend=None):
    """Gated RMSNorm: norm(x) * silu(z) (norm_before_gate) or norm(x * silu(z)), computed in fp32.

    x, z: (..., hidden); weight: (hidden,). The norm runs over consecutive groups of group_size
    channels (all of them when None); group_size must divide hidden. Returns (..., hidden) in x's dtype.
    """
    check_norm_inputs(x, weight)
    check_like("z", z, x)
    hidden = x.shape[-1]
    if group_size is not None and (group_size <= 0 or hidden % group_size != 0):
        raise ValueError(f"group_size: expected a divisor of hidden size {hidden}, got {group_size}")
    check_same_device(x=x, weight=weight, z=z)
    norm = dispatch(_GATED_IMPLS, backend, x)
    return norm(x, weight, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale `weight` (hidden_size,), initialized to one."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """x, residual: (..., hidden_size). See `rms_norm`."""
        return rms_norm(x, self.weight, eps=self.eps, residual=residual, prenorm=prenorm,
                        residual_in_fp32=residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """Gated RMSNorm (Mamba-2's output norm) with a learned scale `weight` (hidden_size,), initialized to one."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, z=None):
        """x, z: (..., hidden_size). See `rms_norm_gated`."""
        return rms_norm_gated(x, self.weight, z=z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")


__all__ = ["rms_norm", "rms_norm_gated", "RMSNorm", "RMSNormGated"]
