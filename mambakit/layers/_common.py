"""Pieces shared by the mixers: parameter initialisation and the inference-cache protocol."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from mambakit.ops._common import (FLOAT_DTYPES, STEP_STATE_DTYPES, check_dtype, check_dtype_choice, check_same_device,
                                  check_shape)
from mambakit.ops.conv1d import ConvStep


def negative_exp(A_log: torch.Tensor) -> torch.Tensor:
    """A = -exp(A_log) in fp32: a mixer's negative (decaying) state matrix from its log parametrization."""
    return -torch.exp(A_log.float())


class ParameterDerived:
    """fn(param), kept and reused while `param` is unchanged: a value that a CPU decode step would otherwise
    recompute every token (A = -exp(A_log)). Recomputed when the parameter changes in place (its version counter
    moves: optimizer steps, load_state_dict) or is replaced (a new address: the entry keeps the old tensor
    alive, so its address cannot come back), or when inference mode is switched (inference tensors cannot be
    saved for backward). Not cached while gradients flow to the parameter, under torch.compile (which fuses fn
    into the step) and on CUDA (the Triton steps derive A in registers, and a captured graph must read the
    parameter itself, not a copy that later updates would leave stale)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self._entry = None  # (key, source, value), replaced as a whole: concurrent callers see one entry

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        if param.is_cuda or torch.compiler.is_compiling() or (param.requires_grad and torch.is_grad_enabled()):
            return self.fn(param)
        key = (param.data_ptr(), param._version, param.dtype, param.device, param.shape,
               torch.is_inference_mode_enabled())
        entry = self._entry
        if entry is None or entry[0] != key:
            entry = self._entry = (key, param.detach(), self.fn(param.detach()))
        return entry[2]


class ProjectedStep:
    """`step`, `step_from_projection`, `in_proj_conv` and `allocate_inference_cache` of a mixer whose decode
    step starts with `in_proj` and its conv; the mixer's `_step(projected, conv_state, ssm_state, conv_applied)
    -> (batch, d_model)` does the rest (states updated in place), `_conv_weight()` and `_conv_offset()` describe
    the conv, `A_log` and `_A()` its state matrix, `_state_shapes(batch)` its (conv_state, ssm_state) shapes."""

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decoding step. hidden_states: (batch, 1, d_model); conv_state and ssm_state, as
        `allocate_inference_cache` makes them, are updated in place. Returns (out (batch, 1, d_model),
        conv_state, ssm_state)."""
        check_layer_input("hidden_states", hidden_states, self.d_model, self.conv1d.weight)
        if hidden_states.shape[1] != 1:
            raise ValueError(f"hidden_states: step decodes one token, expected seqlen 1, got {hidden_states.shape[1]}")
        # The step ops run unchecked (their arguments are this layer's own): the caller's states are checked here.
        check_same_device(hidden_states=hidden_states, conv_state=conv_state, ssm_state=ssm_state)
        conv_shape, ssm_shape = self._state_shapes(hidden_states.shape[0])
        for name, state, shape in (("conv_state", conv_state, conv_shape), ("ssm_state", ssm_state, ssm_shape)):
            check_shape(name, state, *shape)
            if not state.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor (it is updated in place)")
        check_dtype("conv_state", conv_state, FLOAT_DTYPES)
        check_dtype("ssm_state", ssm_state, STEP_STATE_DTYPES)
        return self._decode_token(hidden_states, conv_state, ssm_state)

    def _decode_token(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """`step` on states known to fit (the layer's cached ones)."""
        out = self._step(self.in_proj(hidden_states.squeeze(1)), conv_state, ssm_state, conv_applied=False)
        return out.unsqueeze(1), conv_state, ssm_state

    def step_from_projection(self, projected: torch.Tensor, inference_params, conv_applied: bool = False):
        """A decoding step from in_proj's output (batch, in_proj's out_features) on this layer's cached
        states (a block fuses its norm into in_proj); conv_applied: its conv columns already went through
        `in_proj_conv`'s step. Returns (batch, d_model)."""
        conv_state, ssm_state = self._decode_states(inference_params, projected.shape[0])
        return self._step(projected, conv_state, ssm_state, conv_applied=conv_applied)

    def in_proj_conv(self, inference_params, batch: int) -> ConvStep:
        """The conv step on in_proj's output columns and this layer's cached conv state, for a block that
        runs it as in_proj's epilogue (`rms_norm_linear(..., conv=)`, then `step_from_projection(...,
        conv_applied=True)`)."""
        conv_state, _ = self._decode_states(inference_params, batch)
        return ConvStep(conv_state, self._conv_weight(), self.conv1d.bias, self.activation, self._conv_offset())

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, ssm_dtype=torch.float32,
                                 **kwargs):
        """Zeroed (conv_state, ssm_state) of `_state_shapes(batch_size)`: Mamba's (batch, d_inner, d_conv) and
        (batch, d_inner, d_state), Mamba-2's (batch, conv_dim, d_conv) and (batch, nheads, headdim, d_state).
        dtype: of conv_state (default: the conv weight's); ssm_dtype: fp32 unless told (`ssm_state_zeros`)."""
        device = self.A_log.device  # A_log is always a float parameter (out_proj may be quantized)
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_shape, ssm_shape = self._state_shapes(batch_size)
        return torch.zeros(conv_shape, device=device, dtype=conv_dtype), ssm_state_zeros(ssm_shape, device, ssm_dtype)

    def _step_A(self) -> tuple:
        """(A, A_log) for the step op: A_log alone on CUDA (the Triton step derives A in registers, and a captured
        graph must read the parameter), else the layer's kept A = -exp(A_log) (`ParameterDerived`)."""
        return (None, self.A_log) if self.A_log.is_cuda else (self._A(), None)

    def _decode_states(self, inference_params, batch: int) -> tuple:
        return cached_states(inference_params, self.layer_idx, batch, lambda: self.allocate_inference_cache(batch, 1))


def check_layer_input(name: str, x, d_model: int, weight: torch.Tensor) -> None:
    """x: (batch, seqlen, d_model) on the device and in the dtype of `weight` (a weight of the layer that
    quantization leaves alone, e.g. the conv's) unless autocast is on;
    otherwise an error naming the argument, the expected and the actual value (not a failure deep inside)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{name}: expected shape (batch, seqlen, {d_model}) (d_model {d_model}), got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{name}: expected a tensor on {weight.device} (the layer's device), got {x.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name}: expected dtype {weight.dtype} (the layer's weights; or run under torch.autocast), "
                         f"got {x.dtype}")


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> torch.Tensor:
    """(n,) fp32 bias b with softplus(b) = dt, dt ~ log-uniform[dt_min, dt_max] floored at dt_init_floor."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    log_dt = torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=dt_init_floor)
    # softplus^-1(dt) = log(exp(dt) - 1), written stably for small dt.
    return dt + torch.log(-torch.expm1(-dt))


def ssm_state_zeros(shape: tuple, device: torch.device, ssm_dtype: torch.dtype) -> torch.Tensor:
    """A zeroed SSM state for `allocate_inference_cache`; ssm_dtype: one of STEP_STATE_DTYPES."""
    check_dtype_choice("ssm_dtype", ssm_dtype, STEP_STATE_DTYPES)
    return torch.zeros(shape, device=device, dtype=ssm_dtype)


def no_weight_decay(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Flag a parameter the way the official optimiser grouping expects, and return it."""
    param._no_weight_decay = True
    return param


def cached_states(inference_params, layer_idx: int | None, batch: int, allocate: Callable[[], tuple]) -> tuple:
    """This layer's states in inference_params.key_value_memory_dict (allocated on first use), viewed
    as their first `batch` rows, so that a cache sized for max_batch_size serves smaller batches."""
    if layer_idx is None:
        raise ValueError("layer_idx: decoding with inference_params needs the layer_idx given to the constructor")
    cache = inference_params.key_value_memory_dict
    if layer_idx not in cache:
        cache[layer_idx] = allocate()
    states = cache[layer_idx]
    rows = min(s.shape[0] for s in states if s is not None)
    if rows < batch:
        raise ValueError(f"inference_params: layer {layer_idx} caches {rows} rows, the input has batch {batch}")
    if all(s is None or s.shape[0] == batch for s in states):
        return tuple(states)  # no views to make: this runs per layer and token
    return tuple(None if s is None else s[:batch] for s in states)


def conv_history(conv_state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The `initial_states` (batch, dim, width - 1) of a causal conv continuing from its decode state
    conv_state (batch, dim, width): the newest width - 1 inputs (the oldest one no later output sees)."""
    return conv_state[..., 1:].to(dtype)


def conv_tail(x: torch.Tensor, width: int, seq_idx: torch.Tensor | None = None,
              previous: torch.Tensor | None = None) -> torch.Tensor:
    """The last `width` inputs of a causal conv, as its decode state.

    x: (batch, dim, L); seq_idx: (batch, L) or None; previous: (batch, dim, width) or None, the decode
    state before x (its inputs belong to x's first sequence). Returns (batch, dim, width): left
    zero-padded when fewer inputs exist, and zero where an input belongs to an earlier packed
    sequence than the last one.
    """
    if previous is not None:
        x = torch.cat([previous.to(x.dtype), x[..., -width:]], dim=-1)
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx[:, :1].expand(-1, width), seq_idx[:, -width:]], dim=-1)
    tail = F.pad(x, (width - x.shape[-1], 0))
    if seq_idx is None:
        return tail
    tail_idx = F.pad(seq_idx, (width - seq_idx.shape[-1], 0), value=-1)
    same_sequence = tail_idx == seq_idx[:, -1:]
    return tail * same_sequence.unsqueeze(1).to(tail.dtype)


def conv_tails_varlen(x: torch.Tensor, width: int, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Decode states of a causal conv for each packed sequence.

    x: (1, dim, total) holding the sequences back to back; cu_seqlens: (num_seqs + 1,) their
    boundaries. Returns (num_seqs, dim, width), the last `width` inputs of each sequence,
    zero where a sequence is shorter than `width`.
    """
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    positions = ends[:, None] - width + torch.arange(width, device=x.device)  # (num_seqs, width)
    inside = positions >= starts[:, None]
    tails = x[0][:, positions.clamp(min=0)]  # (dim, num_seqs, width)
    return (tails * inside.to(tails.dtype)).transpose(0, 1)
