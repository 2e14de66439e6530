"""Depthwise causal conv1d: the public functions, their argument checks and the dispatch between paths.

Every path has the signature of `causal_conv1d` without `backend` and receives validated inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mambakit.ops._common import FLOAT_DTYPES, INDEX_DTYPES, check_dtype, check_same_device, check_shape, dispatch
from mambakit.ops.conv1d import reference, step

ACTIVATIONS = (None, "silu", "swish")


def _triton_paths():
    """The Triton paths, imported only once chosen (an import statement: torch.compile traces it)."""
    from mambakit.ops.conv1d import triton_conv, triton_step

    return triton_conv, triton_step


_IMPLS = {
    "reference": lambda: reference.causal_conv1d,
    "triton": lambda: _triton_paths()[0].causal_conv1d,
}
_STEP_IMPLS = {
    "reference": lambda: step.causal_conv1d_update,
    "triton": lambda: _triton_paths()[1].causal_conv1d_update,
}


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                  activation=None, backend=None):
    """Depthwise causal convolution: out_t = act(bias + sum_k weight[:, k] * x_{t-width+1+k}).

    x: (batch, dim, L); weight: (dim, width); bias: (dim,); initial_states: (batch, dim, width-1), the
    inputs before x (zeros when None); seq_idx: (batch, L) int32, non-decreasing: a position sees only
    inputs of its own sequence (initial_states belong to the first); activation: None, "silu" or "swish".
    Returns out (batch, dim, L) in x's dtype and, with return_final_states, final_states
    (batch, dim, width-1): the last width-1 inputs of the last sequence (zero where there are fewer).
    """
    check_shape("x", x, None, None, None)
    batch, dim, length = x.shape
    check_shape("weight", weight, dim, None)
    width = weight.shape[1]
    if width < 1:
        raise ValueError(f"weight: expected width >= 1, got shape {tuple(weight.shape)}")
    check_shape("bias", bias, dim)
    check_shape("seq_idx", seq_idx, batch, length)
    check_shape("initial_states", initial_states, batch, dim, width - 1)
    for name, t in dict(x=x, weight=weight, bias=bias, initial_states=initial_states).items():
        check_dtype(name, t, FLOAT_DTYPES)
    check_dtype("seq_idx", seq_idx, INDEX_DTYPES)
    check_activation(activation)
    check_same_device(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states)
    conv = dispatch(_IMPLS, backend, x)
    return conv(x, weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                return_final_states=return_final_states, activation=activation)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     activation=None):
    """The official `causal_conv1d` package spelling of `causal_conv1d`."""
    return causal_conv1d(x, weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                         return_final_states=return_final_states, activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend=None):
    """One decoding step: conv_state (batch, dim, width) gets x (batch, dim) as its last column, in place.

    weight: (dim, width); bias: (dim,). Returns out (batch, dim) in x's dtype.
    """
    check_shape("x", x, None, None)
    batch, dim = x.shape
    check_shape("weight", weight, dim, None)
    check_shape("conv_state", conv_state, batch, dim, weight.shape[1])
    check_shape("bias", bias, dim)
    for name, t in dict(x=x, conv_state=conv_state, weight=weight, bias=bias).items():
        check_dtype(name, t, FLOAT_DTYPES)
    check_activation(activation)
    check_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias)
    return causal_conv1d_update_unchecked(x, conv_state, weight, bias, activation, backend)


def causal_conv1d_update_unchecked(x, conv_state, weight, bias=None, activation=None, backend=None):
    """`causal_conv1d_update` without its argument checks, for a layer's decode step: its arguments are its own
    parameters, cached states and in_proj output, right by construction, and the checks cost more host time
    per token than the step's small tensor ops on a CPU."""
    return dispatch(_STEP_IMPLS, backend, x)(x, conv_state, weight, bias=bias, activation=activation)


@dataclass(frozen=True)
class ConvStep:
    """A conv decode step on columns offset .. offset + dim of a linear layer's output (a mixer's in_proj),
    for ops that run it as the linear layer's epilogue (`rms_norm_linear(..., conv=...)`): those columns come
    out convolved and conv_state takes their values, as `causal_conv1d_update` of them would.

    state: (rows, dim, width), updated in place; weight: (dim, width); bias: (dim,) or None.
    """

    state: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    activation: str | None = None
    offset: int = 0

    def check(self, rows: int, features: int, device: torch.device) -> None:
        """Refuse a step that does not fit a linear output of (rows, features) on `device`, naming the field."""
        check_shape("conv.weight", self.weight, None, None)
        dim, width = self.weight.shape
        check_shape("conv.state", self.state, rows, dim, width)
        check_shape("conv.bias", self.bias, dim)
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or not 0 <= self.offset <= features - dim:
            raise ValueError(f"conv.offset: expected an int in [0, {features - dim}] ({dim} conv channels of "
                             f"{features} outputs), got {self.offset!r}")
        for name, t in dict(state=self.state, weight=self.weight, bias=self.bias).items():
            check_dtype(f"conv.{name}", t, FLOAT_DTYPES)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"conv.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        for name, t in dict(state=self.state, weight=self.weight, bias=self.bias).items():
            if t is not None and t.device != device:
                raise ValueError(f"conv.{name}: expected a tensor on {device} (the input's device), got {t.device}")

    def apply(self, out: torch.Tensor, backend=None) -> torch.Tensor:
        """The step on a computed output (the unfused path): out (rows, out_features), returned with its conv
        columns convolved (in place)."""
        cols = slice(self.offset, self.offset + self.weight.shape[0])
        out[:, cols] = causal_conv1d_update(out[:, cols], self.state, self.weight, self.bias,
                                            activation=self.activation, backend=backend)
        return out


__all__ = ["causal_conv1d", "causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_update_unchecked", "ConvStep"]
