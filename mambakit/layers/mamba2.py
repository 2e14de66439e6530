"""Mamba-2 mixer: in_proj -> causal depthwise conv over (x, B, C) -> SSD scan -> gated RMSNorm -> out_proj.

Constructor arguments, defaults, parameter names, shapes and initialisation follow the official
`mamba_ssm.modules.mamba2.Mamba2`, so its checkpoints load unchanged. The in_proj output is split
as [z0, x0, z, xBC, dt]: z0, x0 (d_inner - d_ssm each) form a gated MLP beside the SSM.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambakit.ops import RMSNormGated, causal_conv1d, ssd
from mambakit.ops._common import math_state
from mambakit.ops.conv1d import causal_conv1d_update_unchecked
from mambakit.ops.norm_linear import fusable_linear, rms_norm_gated_linear
from mambakit.ops.ssd import seq_idx_from_cu_seqlens, ssd_state_update_unchecked

from ._common import (ParameterDerived, ProjectedStep, cached_states, check_layer_input, conv_history, conv_tail,
                      conv_tails_varlen, inverse_softplus_dt, negative_exp, no_weight_decay)


class Mamba2(ProjectedStep, nn.Module):
    """Structured-state-space-duality mixer of Mamba-2. Input and output (batch, seqlen, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        use_mem_eff_path: bool = True,  # accepted for compatibility: the ops choose their own path
        layer_idx: int | None = None,
        process_group=None,
        sequence_parallel: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if process_group is not None:
            raise NotImplementedError("process_group: tensor-parallel Mamba2 is not supported, expected None")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.conv_init = conv_init
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        self._check_sizes()
        self.nheads = self.d_ssm // headdim
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range: expected 0 < low <= high, got {tuple(A_init_range)}")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.process_group, self.sequence_parallel = process_group, sequence_parallel
        self.layer_idx = layer_idx
        self.activation = "silu"

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias, **factory)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        # dt_bias, A_log and D stay fp32 whatever the layer dtype (the recurrence runs in fp32).
        self.dt_bias = no_weight_decay(nn.Parameter(
            inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, device)))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = no_weight_decay(nn.Parameter(torch.log(A)))
        self.D = no_weight_decay(nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device)))
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._A_from_log = ParameterDerived(negative_exp)

    def _check_sizes(self) -> None:
        for name in ("d_model", "d_state", "d_conv", "headdim", "ngroups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.d_inner, int) or self.d_inner < 1:
            raise ValueError(f"expand: expected expand * d_model to be a positive int, "
                             f"got {self.expand} * {self.d_model}")
        if not isinstance(self.d_ssm, int) or self.d_ssm < 1:
            raise ValueError(f"d_ssm: expected a positive int, got {self.d_ssm!r}")
        if self.d_ssm > self.d_inner:
            raise ValueError(f"d_ssm: expected at most d_inner = expand * d_model = {self.d_inner}, got {self.d_ssm}")
        if self.d_ssm % self.headdim:
            raise ValueError(f"headdim: expected a divisor of d_ssm = {self.d_ssm}, got {self.headdim}")
        nheads = self.d_ssm // self.headdim
        if nheads % self.ngroups:
            raise ValueError(f"ngroups: expected a divisor of nheads = d_ssm / headdim = {nheads}, got {self.ngroups}")

    def forward(self, u: torch.Tensor, seqlen: int | None = None, seq_idx: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, inference_params=None) -> torch.Tensor:
        """u: (batch, seqlen, d_model), or (batch * seqlen, d_model) when `seqlen` is given.

        seq_idx: (batch, seqlen) int32 index of packed sequences (conv and scan states reset where it
        changes); cu_seqlens: (num_seqs + 1,) boundaries of the sequences packed in a batch of 1
        (seq_idx is derived from it when missing; with inference_params, one cached state per sequence).
        With inference_params, the final states go into its cache; when its seqlen_offset > 0 the input
        continues from the cached states (one token: `step`; more: the parallel path, chunked prefill).
        Returns the shape of u.
        """
        flat = seqlen is not None
        hidden = u.unflatten(0, (-1, seqlen)) if flat else u
        check_layer_input("u", hidden, self.d_model, self.conv1d.weight)
        batch, length, _ = hidden.shape
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"cu_seqlens: packed sequences need batch 1, got batch {batch}")
            if seq_idx is None:
                seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, length)
        conv_state = ssm_state = None
        continuing = False
        if inference_params is not None:
            cache_batch = batch if cu_seqlens is None else cu_seqlens.numel() - 1
            conv_state, ssm_state = cached_states(inference_params, self.layer_idx, cache_batch,
                                                  lambda: self.allocate_inference_cache(cache_batch, length))
            continuing = inference_params.seqlen_offset > 0
            if continuing and length == 1:
                out, _, _ = self._decode_token(hidden, conv_state, ssm_state)
                return out.flatten(0, 1) if flat else out
            if continuing and cu_seqlens is not None:
                raise ValueError("cu_seqlens: packed sequences cannot continue from cached states, expected "
                                 f"inference_params.seqlen_offset 0, got {inference_params.seqlen_offset}")

        d_mlp = self.d_inner - self.d_ssm
        z0, x0, z, xBC, dt = self.in_proj(hidden).split(
            [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (batch, conv_dim, seqlen)
        xBC_conv = causal_conv1d(xBC, self._conv_weight(), self.conv1d.bias, seq_idx=seq_idx,
                                 initial_states=conv_history(conv_state, xBC.dtype) if continuing else None,
                                 activation=self.activation)
        if conv_state is not None:
            tail = conv_tails_varlen(xBC, self.d_conv, cu_seqlens) if cu_seqlens is not None else \
                conv_tail(xBC, self.d_conv, seq_idx, previous=conv_state if continuing else None)
            conv_state.copy_(tail)
        xBC = xBC_conv.transpose(1, 2)
        x, B, C = xBC.split([self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        want_varlen = cu_seqlens is not None and ssm_state is not None
        y = ssd(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, self._A(),
            B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
            chunk_size=self.chunk_size, D=self._D(),
            z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)),
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit, seq_idx=seq_idx,
            cu_seqlens=cu_seqlens, initial_states=math_state(ssm_state) if continuing else None,
            return_final_states=ssm_state is not None and not want_varlen, return_varlen_states=want_varlen,
        )
        if ssm_state is not None:
            y, final_states = y
            ssm_state.copy_(final_states)
        out = self._output(y.flatten(-2), z, z0, x0)
        return out.flatten(0, 1) if flat else out

    def _step(self, projected: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
              conv_applied: bool) -> torch.Tensor:
        """The decode step after in_proj (`ProjectedStep`); the states are updated in place."""
        d_mlp = self.d_inner - self.d_ssm
        z0, x0, z, xBC, dt = projected.split(
            [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads], dim=-1)
        if not conv_applied:
            xBC = causal_conv1d_update_unchecked(xBC, conv_state, self._conv_weight(), self.conv1d.bias,
                                                 self.activation)
        x, B, C = xBC.split([self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A, A_log = self._step_A()
        y = ssd_state_update_unchecked(
            ssm_state, x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
            B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
            D=self._D(), z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)),
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit, A_log=A_log,
        )
        y = y.flatten(-2)
        if self.rmsnorm and d_mlp == 0 and fusable_linear(self.out_proj, y):
            # Nothing between the gated norm and a plain out_proj: one op (one launch for a decode step's rows).
            norm = self.norm
            return rms_norm_gated_linear(y, z, norm.weight, self.out_proj.weight, norm.eps, norm.group_size,
                                         norm.norm_before_gate)
        return self._output(y, z, z0, x0)

    def _output(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Gated norm of the SSM output y (..., d_ssm), the gated MLP part in front, then out_proj."""
        if self.rmsnorm:
            y = self.norm(y, z)
        if x0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def _state_shapes(self, batch: int) -> tuple:
        return (batch, self.conv1d.weight.shape[0], self.d_conv), (batch, self.nheads, self.headdim, self.d_state)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # (conv_dim, 1, d_conv) -> (conv_dim, d_conv)

    def _conv_offset(self) -> int:
        return 2 * (self.d_inner - self.d_ssm) + self.d_ssm  # in_proj's xBC columns follow z0, x0 and z

    def _A(self) -> torch.Tensor:
        return self._A_from_log(self.A_log)  # (nheads,), negative: a decaying state

    def _D(self) -> torch.Tensor:
        return self.D.float().view(self.nheads, self.headdim) if self.D_has_hdim else self.D.float()
