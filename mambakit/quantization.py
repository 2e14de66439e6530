"""Int8 weight-only quantization of a loaded model's linear layers, for CPU inference.

    model = MambaLMHeadModel.from_pretrained("ckpt", dtype=torch.bfloat16)
    mambakit.quantize(model, "int8")

Decoding reads every weight once per token, so its speed on a CPU is set by memory bandwidth: int8
weights halve the bytes of bf16 (a quarter of fp32). Each output channel keeps one scale
(symmetric, absmax / 127); activations, states and accumulation stay in floating point. A few-row
product (a decode step) runs torch's fused int8 matrix-vector kernel (`aten._weight_int8pack_mm`,
bf16 activations, fp32 accumulation; inside torch.compile one row runs as `rowwise_linear`); a
many-row one (a prefill) dequantizes the weight once and runs a dense matmul, which is faster there. Quantization happens in memory only: a quantized model
refuses to be saved, so a checkpoint on disk never holds int8 weights.

Quantized: the Mamba / Mamba-2 mixers' in_proj, x_proj and out_proj, the gated MLPs' fc1 and fc2,
and the LM head. Kept in floating point: Mamba-1's dt_proj (its product feeds the softplus of the
time step and is fused into the decode step; ~1% of the weights), the conv, the norms, the
embedding, and attention layers (their KV cache takes its dtype from out_proj).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.layers import GatedMLP, Mamba, Mamba2
from mambakit.ops.rowwise_linear import is_one_row, rowwise_linear

QUANTIZE_CHOICES = ("int8",)
# Products with more rows than this dequantize the weight and use a dense matmul (prefill).
FUSED_MAX_ROWS = 16
# The fused kernel's activation dtype: its fp32 variant is several times slower on AVX-512 CPUs.
FUSED_DTYPE = torch.bfloat16
# Linear children quantized in each module type (absent ones, e.g. x_proj of Mamba2, are skipped).
QUANTIZED_CHILDREN = {Mamba: ("in_proj", "x_proj", "out_proj"), Mamba2: ("in_proj", "out_proj"),
                      GatedMLP: ("fc1", "fc2")}


class InferenceLinear(nn.Module):
    """Base of the inference-time stand-ins for `nn.Linear` (int8, prepacked): never saved, since
    their buffers are no checkpoint format. Subclasses name what they hold (`held_as`) and the call
    that makes them again (`redo`), for the error."""

    held_as: str
    redo: str

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"state_dict: {prefix.rstrip('.') or 'this layer'} {self.held_as}, which is no checkpoint "
                           f"format; save the original model and {self.redo} it again after loading")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(InferenceLinear):
    """A linear layer with an int8 weight (out, in) and one scale per output channel.

    Input (..., in_features), output (..., out_features) in the input's dtype. Built from an
    `nn.Linear` by `Int8Linear.from_linear`; the bias (if any) stays in its own dtype.
    """

    held_as = "is int8-quantized"
    redo = "quantize"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 dense_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.dense_dtype = dense_dtype  # the original weight's dtype: many-row products run in it
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)  # (out,) in FUSED_DTYPE, as the fused kernel wants
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize `linear`'s weight per output channel: w ~= weight_int8 * scales[:, None]."""
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        weight_int8 = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight_int8, scales.to(FUSED_DTYPE), bias, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and is_one_row(x):  # a compiled batch-1 decode step streams the weight
            return rowwise_linear(x, self.weight_int8, self.scales, self.bias)
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= FUSED_MAX_ROWS:
            # The kernel needs rows contiguous in memory (Mamba-1's x_proj reads a transposed view).
            y = torch.ops.aten._weight_int8pack_mm(rows.to(FUSED_DTYPE).contiguous(), self.weight_int8, self.scales)
        else:
            weight = self.weight_int8.to(self.dense_dtype) * self.scales[:, None].to(self.dense_dtype)
            y = F.linear(rows.to(self.dense_dtype), weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace `model`'s linear layers (see the module docstring) by `Int8Linear`s, in place; returns `model`.

    method: "int8" (weight-only, per-channel scales). The model must be on the CPU; its files on disk
    are never touched. A tied LM head gets its own int8 copy (the embedding stays as it is).
    """
    if method not in QUANTIZE_CHOICES:
        raise ValueError(f"method: expected one of {QUANTIZE_CHOICES}, got {method!r}")
    return replace_inference_linears(model, Int8Linear.from_linear, "int8 weight-only quantization")


def replace_inference_linears(model: nn.Module, convert: Callable[[nn.Linear], nn.Module], what: str) -> nn.Module:
    """Swap each of `inference_linears(model)` for `convert(linear)`, in place; the model must be on the CPU
    (`what` names the conversion in the error)."""
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"model: {what} runs on the CPU, got parameters on {sorted(devices)}")
    for module, name in inference_linears(model):
        setattr(module, name, convert(getattr(module, name)))
    return model


def inference_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, child name) of every plain `nn.Linear` that an inference-time replacement swaps: the
    children named in QUANTIZED_CHILDREN and the LM head."""
    targets = [(module, name) for module in model.modules() for kind, names in QUANTIZED_CHILDREN.items()
               if isinstance(module, kind) for name in names if type(getattr(module, name, None)) is nn.Linear]
    if type(getattr(model, "lm_head", None)) is nn.Linear:
        targets.append((model, "lm_head"))
    return targets
