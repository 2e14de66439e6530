"""One decoding step of the causal conv as a Triton kernel: shift the window, insert the new input and
convolve, reading and writing the rolling state once, in place (the official `causal_conv1d_update`)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops._common import custom_op_if_compiling, overlap
from mambakit.ops._triton import program_index, wait_for_inputs
from mambakit.ops.conv1d import step

BLOCK_D = 64


@triton.jit
def conv_step_channels(x, state_rows, s_sw, w_rows, bias_ptr, mask, W: tl.constexpr, W_P2: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """The step for a block of channels: x (BLOCK,) their new inputs; state_rows and w_rows (BLOCK,) pointers
    to each channel's window (stride s_sw) and its W contiguous taps; bias_ptr (BLOCK,) to its bias. The
    window <- [window[1:], x] is stored; returns act(sum_k w[k] window[k] + bias) in fp32."""
    k = tl.arange(0, W_P2)
    window = tl.load(state_rows[:, None] + (k + 1)[None, :] * s_sw, mask=mask[:, None] & (k < W - 1)[None, :],
                     other=0.0)
    window = tl.where((k == W - 1)[None, :], x[:, None].to(window.dtype), window)
    taps = mask[:, None] & (k < W)[None, :]
    tl.store(state_rows[:, None] + k[None, :] * s_sw, window, mask=taps)
    w = tl.load(w_rows[:, None] + k[None, :], mask=taps, other=0.0)
    acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        acc *= tl.sigmoid(acc)
    return acc


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr, dim, s_xb, s_xd, s_sb, s_sd, s_sw, s_ob,
                        W: tl.constexpr, W_P2: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SILU: tl.constexpr, PDL: tl.constexpr):
    """state (batch, dim, W) <- [state[:, :, 1:], x]; out = act(sum_k w[:, k] state[:, :, k] + bias)."""
    b = program_index(0)
    d = program_index(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d < dim
    wait_for_inputs(PDL)
    x = tl.load(x_ptr + b * s_xb + d * s_xd, mask=mask_d, other=0.0)
    acc = conv_step_channels(x, state_ptr + b * s_sb + d * s_sd, s_sw, w_ptr + d * W, bias_ptr + d, mask_d,
                             W, W_P2, HAS_BIAS, SILU)
    tl.store(out_ptr + b * s_ob + d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


def _conv_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """The kernel launch (in place on conv_state); registered as a custom op so that torch.compile keeps it whole."""
    batch, dim = x.shape
    width = weight.shape[1]
    out = x.new_empty(x.shape)  # contiguous: the kernel writes it with unit stride along dim
    pdl = overlap(x.device)
    _conv_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        x, conv_state, weight, bias if bias is not None else weight, out, dim, *x.stride(),
        *conv_state.stride(), out.stride(0), W=width, W_P2=triton.next_power_of_2(width), BLOCK_D=BLOCK_D,
        HAS_BIAS=bias is not None, SILU=silu, PDL=pdl, launch_pdl=pdl,
    )
    return out


_conv_update_op = torch.library.custom_op("mambakit::causal_conv1d_update", _conv_update,
                                          mutates_args=("conv_state",))


@_conv_update_op.register_fake
def _(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Triton conv decode step; arguments as `mambakit.ops.causal_conv1d_update` (validated there).
    fp64 goes to the reference."""
    if any(t is not None and t.dtype == torch.float64 for t in (x, conv_state, weight, bias)):
        return step.causal_conv1d_update(x, conv_state, weight, bias=bias, activation=activation)
    bias = bias.contiguous() if bias is not None else None
    update = custom_op_if_compiling(_conv_update_op, _conv_update)
    return update(x, conv_state, weight.contiguous(), bias, activation is not None)
