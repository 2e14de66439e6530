"""One-row products as reductions that torch.compile's CPU backend streams at memory bandwidth.

A decode step at batch 1 multiplies one row by every weight matrix: the weight is read once and each
element used once, so the product is bound by memory bandwidth. oneDNN's kernels read 20-29 GB/s of the ~35
a 1 GiB sum reads on this project's CPU (bf16 and fp32, 2 threads); written as `(weight * row).sum(-1)`,
inductor's vectorized C++ reduction reads 28-42 GB/s, timed alone (DESIGN.md, CPU inference). Only inside
torch.compile: eagerly the same expression would materialize the (out, in) product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def is_one_row(x: torch.Tensor) -> bool:
    """True when x (..., in) holds a single row (every leading size 1)."""
    return x.numel() == x.shape[-1]


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) with one row, weight (out, in) float or int8, scales (out,) or None, bias (out,) or None
    -> (..., out) in x's dtype: `(weight * scales[:, None]) @ row + bias`, accumulated in fp32."""
    row = x.reshape(1, -1).float()
    # as_strided makes inductor write the row out before the reduction: left as an expression, the norm or
    # gate that produced it would be recomputed for every one of the `out` output elements.
    row = torch.as_strided(row, row.shape, row.stride())
    y = (weight.float() * row).sum(-1)
    if scales is not None:
        y = y * scales.float()
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


class RowwiseProducts(TorchFunctionMode):
    """Inside (while torch.compile traces a CPU decode step): every `F.linear` of one row on the CPU runs
    as `rowwise_linear`; other products are left as they are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.device.type == "cpu" and is_one_row(x):
                return rowwise_linear(x, weight, bias=bias)
        if func is torch.Tensor.unflatten:  # its Python body calls super(), which dynamo cannot trace under a mode
            return torch.unflatten(*args, **kwargs)
        if func is torch.Tensor.split:  # recorded as itself, a node that keeps AOTAutograd's cache from the graph
            return torch.split(*args, **kwargs)
        return func(*args, **kwargs)
