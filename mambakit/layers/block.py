"""Residual block of the official Mamba models: add -> norm -> mixer [-> add -> norm -> MLP].

The block returns the mixer (or MLP) output and the running residual separately, so that the next
block can fuse "add the residual" with its norm; the model adds the last output after the stack.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from mambakit.ops import RMSNorm, rms_norm
from mambakit.ops.norm_linear import fusable_linear, rms_norm_linear


class Block(nn.Module):
    """Prenorm residual block around a mixer (Mamba, Mamba2, MHA) and an optional MLP.

    mixer_cls, mlp_cls, norm_cls: callables taking `dim` (mlp_cls=nn.Identity means no MLP).
    residual_in_fp32 keeps the residual stream in fp32; fused_add_norm computes add + RMSNorm in one
    op (same result as the unfused path).
    """

    def __init__(self, dim: int, mixer_cls: Callable, mlp_cls: Callable,
                 norm_cls: Callable = nn.LayerNorm, fused_add_norm: bool = False, residual_in_fp32: bool = False):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None
        if fused_add_norm and not isinstance(self.norm, (nn.LayerNorm, RMSNorm)):
            raise ValueError(f"norm_cls: fused_add_norm needs nn.LayerNorm or RMSNorm, got {type(self.norm).__name__}")

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, inference_params=None,
                **mixer_kwargs):
        """hidden_states, residual: (batch, seqlen, dim); residual is None for the first block.
        Returns (hidden_states, residual): the sublayer output and the residual stream before it."""
        if not mixer_kwargs and self._norm_fuses_into_mixer(hidden_states, inference_params):
            return self._fused_step(hidden_states, residual, inference_params)
        hidden_states, residual = self._add_norm(self.norm, hidden_states, residual)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(self.norm2, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def _norm_fuses_into_mixer(self, hidden_states: torch.Tensor, inference_params) -> bool:
        """A decode step whose add + norm can run inside the mixer's in_proj (`fusable_linear`)."""
        if inference_params is None or inference_params.seqlen_offset == 0 or hidden_states.shape[1] != 1:
            return False
        return (self.mlp is None and self.fused_add_norm and isinstance(self.norm, RMSNorm)
                and hasattr(self.mixer, "in_proj_conv")
                and fusable_linear(getattr(self.mixer, "in_proj", None), hidden_states))

    def _fused_step(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, inference_params):
        """forward's decode step with add + norm + in_proj + the mixer's conv step as one op (one launch for a
        few rows on CUDA)."""
        conv = self.mixer.in_proj_conv(inference_params, hidden_states.shape[0])
        projected, residual = rms_norm_linear(
            hidden_states[:, 0], self.norm.weight, self.mixer.in_proj.weight, self.norm.eps,
            residual=None if residual is None else residual[:, 0], residual_in_fp32=self.residual_in_fp32, conv=conv)
        out = self.mixer.step_from_projection(projected, inference_params, conv_applied=True)
        return out.unsqueeze(1), residual.unsqueeze(1)

    def _add_norm(self, norm: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        """(norm(hidden_states + residual), hidden_states + residual), the sum in fp32 if residual_in_fp32."""
        if self.fused_add_norm and isinstance(norm, RMSNorm):
            return rms_norm(hidden_states, norm.weight, norm.eps, residual=residual, prenorm=True,
                            residual_in_fp32=self.residual_in_fp32)
        residual = hidden_states if residual is None else hidden_states + residual
        normed = norm(residual.to(norm.weight.dtype))
        return normed, residual.float() if self.residual_in_fp32 else residual

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """The mixer's decoding states (see the mixer's allocate_inference_cache)."""
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
