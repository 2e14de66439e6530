"""Mamba (v1) mixer: in_proj -> causal depthwise conv -> selective scan (S6) gated by z -> out_proj.

Constructor arguments, defaults, parameter names, shapes and initialisation follow the official
`mamba_ssm.modules.mamba_simple.Mamba`, so its checkpoints load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambakit.ops import causal_conv1d, selective_scan
from mambakit.ops._common import math_state
from mambakit.ops.conv1d import causal_conv1d_update_unchecked
from mambakit.ops.selective_scan import selective_state_update_unchecked
from mambakit.ops.norm_linear import decode_linear

from ._common import (ParameterDerived, ProjectedStep, cached_states, check_layer_input, conv_history, conv_tail,
                      inverse_softplus_dt, negative_exp, no_weight_decay)


def _channels_first(linear: nn.Module, tokens: torch.Tensor, batch: int, with_bias: bool = True) -> torch.Tensor:
    """linear over tokens (batch * seqlen, in) -> (batch, out, seqlen) with steps adjacent: for an nn.Linear,
    one matmul weight @ tokens^T and no copy; any other module (a quantized linear) runs as it is."""
    if type(linear) is not nn.Linear:
        out = linear(tokens)
        return out.view(batch, -1, out.shape[-1]).transpose(1, 2)
    bias = linear.bias if with_bias else None
    out = linear.weight @ tokens.mT if bias is None else torch.addmm(bias[:, None], linear.weight, tokens.mT)
    return out.view(out.shape[0], batch, -1).permute(1, 0, 2)


def _tokens_by_channels(x: torch.Tensor) -> torch.Tensor:
    """(batch, channels, seqlen) -> (batch * seqlen, channels): a view when x came from `_channels_first`."""
    return x.permute(0, 2, 1).reshape(-1, x.shape[1])


class Mamba(ProjectedStep, nn.Module):
    """Selective state space mixer of Mamba-1. Input and output (batch, seqlen, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,  # accepted for compatibility: the ops choose their own path
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"dt_rank: expected 'auto' or a positive int, got {dt_rank!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        if self.d_inner < 1:
            raise ValueError(f"expand: expected expand * d_model >= 1, got {expand} * {d_model}")
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        # dt_proj keeps the variance of dt at initialisation; its bias puts softplus(bias) in [dt_min, dt_max].
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(dt_init_std)
            else:
                self.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor, device))
        self.dt_proj.bias._no_reinit = True  # a model-wide init that zeroes biases must spare this one

        # S4D-real: A[:, n] = -(n + 1) for every channel; A_log and D stay fp32 whatever the layer dtype.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = no_weight_decay(nn.Parameter(torch.log(A)))
        self.D = no_weight_decay(nn.Parameter(torch.ones(self.d_inner, device=device)))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._A_from_log = ParameterDerived(negative_exp)

    def forward(self, hidden_states: torch.Tensor, inference_params=None, seq_idx: torch.Tensor | None = None):
        """hidden_states: (batch, seqlen, d_model); seq_idx: (batch, seqlen) int32 index of packed
        sequences (states reset where it changes). Returns (batch, seqlen, d_model).

        With inference_params, the final states go into its cache; when its seqlen_offset > 0 the input
        continues from the cached states (one token: `step`; more: the parallel path, chunked prefill).
        """
        check_layer_input("hidden_states", hidden_states, self.d_model, self.conv1d.weight)
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        continuing = False
        if inference_params is not None:
            conv_state, ssm_state = cached_states(inference_params, self.layer_idx, batch,
                                                  lambda: self.allocate_inference_cache(batch, seqlen))
            continuing = inference_params.seqlen_offset > 0
            if continuing and seqlen == 1:
                out, _, _ = self._decode_token(hidden_states, conv_state, ssm_state)
                return out

        # Projections as weight @ (features, tokens): the outputs come (batch, channels, seqlen) with steps
        # adjacent, the layout the conv and the scan read, and the next projection reads them with no copy.
        xz = _channels_first(self.in_proj, hidden_states.reshape(-1, self.d_model), batch)
        x, z = xz.chunk(2, dim=1)  # (batch, d_inner, seqlen) each
        x_conv = causal_conv1d(x, self._conv_weight(), self.conv1d.bias, seq_idx=seq_idx, activation=self.activation,
                               initial_states=conv_history(conv_state, x.dtype) if continuing else None)
        if conv_state is not None:
            conv_state.copy_(conv_tail(x, self.d_conv, seq_idx, previous=conv_state if continuing else None))
        x = x_conv

        dt, B, C = self.x_proj(_tokens_by_channels(x)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = _channels_first(self.dt_proj, dt, batch, with_bias=False)  # its bias is added inside the scan, in fp32
        B, C = (t.view(batch, seqlen, self.d_state).transpose(1, 2) for t in (B, C))  # (batch, d_state, seqlen)
        y = selective_scan(
            x, dt, self._A(), B, C, self.D.float(),
            z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            initial_state=math_state(ssm_state) if continuing else None,
            return_final_state=ssm_state is not None, seq_idx=seq_idx,
        )
        if ssm_state is not None:
            y, final_state = y
            ssm_state.copy_(final_state)
        return self.out_proj(_tokens_by_channels(y)).view(batch, seqlen, self.d_model)

    def _step(self, projected: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
              conv_applied: bool) -> torch.Tensor:
        """The decode step after in_proj (`ProjectedStep`); the states are updated in place."""
        x, z = projected.chunk(2, dim=-1)  # (batch, d_inner) each
        if not conv_applied:
            x = causal_conv1d_update_unchecked(x, conv_state, self._conv_weight(), self.conv1d.bias, self.activation)
        dt, B, C = decode_linear(self.x_proj, x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj happens inside the step, and so does A = -exp(A_log) on CUDA: fewer launches per token.
        A, A_log = self._step_A()
        y = selective_state_update_unchecked(ssm_state, x, dt, A, B, C, self.D.float(), z=z, dt_bias=self.dt_proj.bias,
                                             dt_softplus=True, A_log=A_log, dt_proj_weight=self.dt_proj.weight)
        return decode_linear(self.out_proj, y)

    def _state_shapes(self, batch: int) -> tuple:
        return (batch, self.d_inner, self.d_conv), (batch, self.d_inner, self.d_state)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # (d_inner, 1, d_conv) -> (d_inner, d_conv)

    def _conv_offset(self) -> int:
        return 0  # in_proj's x columns come first

    def _A(self) -> torch.Tensor:
        return self._A_from_log(self.A_log)  # (d_inner, d_state), negative: a decaying state
