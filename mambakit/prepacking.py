"""oneDNN-prepacked linear layers for CPU inference: the same fp32 / bf16 weights, a faster matmul.

    model = MambaLMHeadModel.from_pretrained("ckpt", dtype=torch.bfloat16)
    mambakit.prepack(model)

torch's oneDNN (mkldnn) backend can reorder a weight once into the blocked layout its matmul kernels
read; a product with few rows (a decode step) then runs about 2x faster than `F.linear` on the plain
weight on this project's CPU (bf16: 130M in_proj 117 vs 294 us, LM head 5.7 vs 10.8 ms at one thread;
fp32 LM head at 8 rows 13 vs 41 ms), with bit-identical bf16 results (fp32: within 5e-7). The layers
replaced are those `quantize` replaces (the mixers' in_proj, x_proj, out_proj, the gated MLPs, the LM
head; a tied head gets its own packed copy). Inference only (no gradient), in memory only: a prepacked
model refuses to be saved, so a checkpoint on disk never holds the packed layout.
"""
from __future__ import annotations

import torch
from torch import nn

from mambakit.ops._common import custom_op_if_compiling
from mambakit.quantization import InferenceLinear, replace_inference_linears

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def prepack_available() -> bool:
    """True when this torch build has the oneDNN linear ops (x86 and most ARM builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packed_linear(rows: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows (n, in) dense, packed_weight (out, in) in oneDNN's layout, bias (out,) or None -> (n, out)."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed_weight, bias, "none", [], "")


# A custom op for torch.compile: inductor has no lowering for oneDNN's product on a packed weight that is a graph
# input (it packs weights itself only when freezing), so the compiled step calls it as one opaque node.
_packed_linear_op = torch.library.custom_op("mambakit::packed_linear", _packed_linear, mutates_args=())


@_packed_linear_op.register_fake
def _(rows, packed_weight, bias):
    return rows.new_empty(rows.shape[0], packed_weight.shape[0])


class PackedLinear(InferenceLinear):
    """A linear layer whose weight (out, in) is held in oneDNN's blocked layout.

    Input (..., in_features) in the weight's dtype, output (..., out_features). Built from an
    `nn.Linear` by `PackedLinear.from_linear`; the bias (if any) is kept as it is.
    """

    held_as = "holds a oneDNN-prepacked weight"
    redo = "prepack"

    def __init__(self, packed_weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = packed_weight.shape
        self.register_buffer("packed_weight", packed_weight)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        weight = linear.weight.detach()
        if weight.dtype not in PACKED_DTYPES:
            raise ValueError(f"linear: expected weights in {PACKED_DTYPES} to prepack, got {weight.dtype}")
        bias = None if linear.bias is None else linear.bias.detach().to(weight.dtype)
        return cls(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()  # the kernel reads dense rows
        y = custom_op_if_compiling(_packed_linear_op, _packed_linear)(rows, self.packed_weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def prepack(model: nn.Module) -> nn.Module:
    """Replace `model`'s fp32 / bf16 projections and LM head (see the module docstring) by `PackedLinear`s,
    in place; returns `model`. Layers already replaced (e.g. int8-quantized ones) are left as they are.
    The model must be on the CPU and this torch build must have oneDNN (`prepack_available()`)."""
    if not prepack_available():
        raise RuntimeError("prepack: this torch build has no oneDNN (mkldnn) linear ops")
    return replace_inference_linears(model, PackedLinear.from_linear, "prepacking")
