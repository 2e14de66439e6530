"""RMSNorm (with the residual add, or gated) and the bias-free linear layer after it, as one op for decode
steps: a block's pre-norm and its mixer's in_proj, Mamba-2's gated output norm and its out_proj.

The Triton path fuses the norm into the matrix-vector products (one launch, the normalized row never
stored); it is the default on CUDA for at most MAX_FUSED_ROWS rows, where launches dominate. Otherwise
(more rows, the CPU, fp64, inputs that need gradients) the two run unfused: the norm op on the same
`backend`, then F.linear (cuBLAS / oneDNN); `backend="reference"` is the norm's reference then F.linear.
`rms_norm_linear` also takes the conv decode step that follows a mixer's in_proj (`ConvStep`), fused as
the kernel's epilogue and otherwise run after the linear layer on the same backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.ops._common import check_same_device, check_shape, choose_backend
from mambakit.ops.conv1d import ConvStep
from mambakit.ops.norm import check_like, check_norm_inputs, rms_norm, rms_norm_gated
from mambakit.ops.norm import reference as norm_reference

MAX_FUSED_ROWS = 8  # beyond this, the weight read per row costs more than the launch saved


def _use_triton(backend: str | None, x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """The Triton path has no backward: inputs that need gradients run unfused."""
    tensors = (x, *tensors)
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    chosen = choose_backend(backend, x, ("reference", "triton"))
    return chosen == "triton" and (backend == "triton" or x.shape[0] <= MAX_FUSED_ROWS)


def fusable_linear(linear: torch.nn.Module | None, x: torch.Tensor) -> bool:
    """`linear` can be given to these ops as its weight: a plain bias-free nn.Linear in x's dtype, outside
    autocast (which would cast the linear's inputs); quantized or prepacked linears run as modules."""
    return (type(linear) is torch.nn.Linear and linear.bias is None and linear.weight.dtype == x.dtype
            and not torch.is_autocast_enabled(x.device.type))


def _check(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, **like: torch.Tensor | None) -> None:
    check_norm_inputs(x, norm_weight)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (rows, hidden), got {tuple(x.shape)}")
    for name, t in like.items():
        check_like(name, t, x)
    check_shape("weight", weight, None, x.shape[1])
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected x's dtype {x.dtype}, got {weight.dtype}")
    check_same_device(x=x, norm_weight=norm_weight, weight=weight, **like)


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def rms_norm_linear(x, norm_weight, weight, eps=1e-5, residual=None, residual_in_fp32=False, backend=None,
                    conv: ConvStep | None = None):
    """F.linear(rms_norm(x + residual), weight) and the sum x + residual (a pre-norm block's step).

    x, residual: (rows, hidden); norm_weight: (hidden,); weight: (out, hidden), x's dtype. Returns
    (out (rows, out) in x's dtype, summed (rows, hidden) in residual's dtype (x's when None), fp32 when
    residual_in_fp32), as `rms_norm(..., prenorm=True)` followed by the linear layer, then `conv` (a
    `ConvStep` on some of out's columns, its state updated in place) when given.
    """
    _check(x, norm_weight, weight, residual=residual)
    if conv is not None:
        conv.check(x.shape[0], weight.shape[0], x.device)
    if not _use_triton(backend, x, residual, norm_weight, weight):
        normed, summed = rms_norm(x, norm_weight, eps, residual=residual, prenorm=True,
                                  residual_in_fp32=residual_in_fp32, backend=backend)
        out = F.linear(normed, weight)
        return (out if conv is None else conv.apply(out, backend)), summed
    from mambakit.ops.norm_linear import triton_decode

    return triton_decode.norm_linear(_unit_stride(x), _unit_stride(residual), None, norm_weight.contiguous(),
                                     weight.contiguous(), eps, x.shape[1], False,
                                     norm_reference.prenorm_residual_dtype(x, residual, residual_in_fp32), conv)


def rms_norm_gated_linear(x, z, norm_weight, weight, eps=1e-5, group_size=None, norm_before_gate=True, backend=None):
    """F.linear(rms_norm_gated(x, z), weight) (Mamba-2's output norm and out_proj).

    x, z: (rows, hidden); norm_weight: (hidden,); weight: (out, hidden), x's dtype; group_size divides
    hidden (None: one group). Returns (rows, out) in x's dtype.
    """
    _check(x, norm_weight, weight, z=z)
    hidden = x.shape[1]
    group_size = hidden if group_size is None else group_size
    if group_size <= 0 or hidden % group_size != 0:
        raise ValueError(f"group_size: expected a divisor of hidden size {hidden}, got {group_size}")
    if not _use_triton(backend, x, z, norm_weight, weight):
        return F.linear(rms_norm_gated(x, norm_weight, z=z, eps=eps, group_size=group_size,
                                       norm_before_gate=norm_before_gate, backend=backend), weight)
    from mambakit.ops.norm_linear import triton_decode

    out, _ = triton_decode.norm_linear(_unit_stride(x), None, _unit_stride(z), norm_weight.contiguous(),
                                       weight.contiguous(), eps, group_size, z is not None and not norm_before_gate,
                                       None)
    return out


def decode_linear(linear: torch.nn.Module, x: torch.Tensor, backend=None) -> torch.Tensor:
    """linear(x) for x (rows, in): on the Triton path (CUDA, at most MAX_FUSED_ROWS rows) a `fusable_linear`
    with at most MAX_ONE_CHUNK inputs runs in the same kernel as the fused ops, without the norm (a decode
    step's launches then all overlap their predecessors in a CUDA graph); otherwise the module itself."""
    if x.dim() != 2 or not fusable_linear(linear, x) or not _use_triton(backend, x, linear.weight):
        return linear(x)
    from mambakit.ops.norm_linear import triton_decode

    if x.shape[1] > triton_decode.MAX_ONE_CHUNK:
        return linear(x)
    out, _ = triton_decode.norm_linear(_unit_stride(x), None, None, None, linear.weight.contiguous(), 0.0,
                                       x.shape[1], False, None)
    return out


__all__ = ["rms_norm_linear", "rms_norm_gated_linear", "decode_linear", "fusable_linear", "MAX_FUSED_ROWS"]
