"""Multi-head attention for hybrid models: grouped-query heads, rotary embeddings, KV cache.

Constructor arguments, defaults and parameter names follow the official `mamba_ssm.modules.mha.MHA`,
so its checkpoints load unchanged. Attention runs through `F.scaled_dot_product_attention`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambakit.ops import causal_conv1d, causal_conv1d_update

from ._common import cached_states, conv_history, conv_tail


def rotary_cos_sin(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, fp32, shape positions.shape + (dim // 2,).

    Pair i of a head turns by angle position * base^(-2i / dim) (RoFormer, Su et al. 2021).
    """
    inv_freq = base ** -(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of each head; the rest pass through.

    x: (batch, seqlen, nheads, head_dim); cos, sin: (batch or 1, seqlen, rotary_dim // 2).
    Pairs are (i, i + rotary_dim // 2) (GPT-NeoX layout), or (2i, 2i + 1) when `interleaved`.
    """
    rotary_dim = 2 * cos.shape[-1]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated.to(x.dtype), rest], dim=-1)


class MHA(nn.Module):
    """Self-attention with optional GQA (num_heads_kv < num_heads), rotary embeddings, a short
    causal conv over q, k, v (d_conv > 0) and a gated MLP fused into in_proj (mlp_dim > 0).
    Input and output (batch, seqlen, embed_dim)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: int | None = None,
        head_dim: int | None = None,
        mlp_dim: int = 0,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        softmax_scale: float | None = None,
        causal: bool = False,
        layer_idx: int | None = None,
        d_conv: int = 0,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if num_heads < 1 or self.num_heads_kv < 1 or num_heads % self.num_heads_kv:
            raise ValueError(f"num_heads_kv: expected a positive divisor of num_heads = {num_heads}, "
                             f"got {self.num_heads_kv}")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim = {embed_dim} (or give head_dim), "
                             f"got {num_heads}")
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        if rotary_emb_dim < 0 or rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"rotary_emb_dim: expected an even number in [0, head_dim = {self.head_dim}], "
                             f"got {rotary_emb_dim}")
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256  # the official rounding, so checkpoint shapes agree
        self.softmax_scale, self.causal = softmax_scale, causal
        self.layer_idx, self.d_conv = layer_idx, d_conv
        self.rotary_emb_dim, self.rotary_emb_base = rotary_emb_dim, rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved

        qkv_dim = self.head_dim * (num_heads + 2 * self.num_heads_kv)
        self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=d_conv, padding=d_conv - 1, groups=qkv_dim,
                                    **factory)
        self.out_proj = nn.Linear(self.head_dim * num_heads + self.mlp_dim // 2, embed_dim, bias=out_proj_bias,
                                  **factory)

    def forward(self, x: torch.Tensor, inference_params=None) -> torch.Tensor:
        """x: (batch, seqlen, embed_dim) -> (batch, seqlen, embed_dim).

        With inference_params: seqlen_offset == 0 fills the KV cache from position 0 (prefill);
        > 0 continues each row at position lengths_per_sample[b] (or seqlen_offset): one token
        through `step`, more through the parallel path over the cached keys (chunked prefill).
        """
        if inference_params is None:
            return self._parallel(x)
        kv_cache, conv_state = cached_states(
            inference_params, self.layer_idx, x.shape[0],
            lambda: self.allocate_inference_cache(x.shape[0], inference_params.max_seqlen, dtype=x.dtype))
        if inference_params.seqlen_offset == 0:
            return self._parallel(x, kv_cache, conv_state)
        lengths = inference_params.lengths_per_sample
        cache_seqlens = inference_params.seqlen_offset if lengths is None else lengths
        if x.shape[1] == 1:
            out, _, _ = self.step(x, kv_cache, conv_state, cache_seqlens)
            return out
        return self._parallel(x, kv_cache, conv_state, cache_seqlens)

    def _parallel(self, x, kv_cache=None, conv_state=None, cache_seqlens=None):
        """Attention over the whole input: from position 0 when cache_seqlens is None, else row b
        continues at position cache_seqlens[b] (an int or a (batch,) LongTensor), attending causally to
        the keys already in kv_cache. Fills kv_cache and conv_state when given."""
        batch, seqlen, _ = x.shape
        continuing = cache_seqlens is not None
        qkv, x_mlp = self._in_proj(x)
        if self.d_conv > 0:
            qkv = qkv.transpose(1, 2)
            qkv_conv = causal_conv1d(qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                     initial_states=conv_history(conv_state, qkv.dtype) if continuing else None)
            if conv_state is not None:
                conv_state.copy_(conv_tail(qkv, self.d_conv, previous=conv_state if continuing else None))
            qkv = qkv_conv.transpose(1, 2)
        q, k, v = self._split_heads(qkv)
        offsets = torch.arange(seqlen, device=x.device)
        positions = offsets[None] if not continuing else \
            _row_positions(cache_seqlens, batch, x.device)[:, None] + offsets  # (batch or 1, seqlen)
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_cos_sin(positions, self.rotary_emb_dim, self.rotary_emb_base)
            q, k = (apply_rotary(t, cos, sin, self.rotary_emb_interleaved) for t in (q, k))
        if continuing:
            context = self._attend_with_cache(q, k, v, kv_cache, positions)
        else:
            if kv_cache is not None:
                kv_cache[:, :seqlen, 0] = k
                kv_cache[:, :seqlen, 1] = v
            context = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal,
                scale=self.softmax_scale, enable_gqa=self.num_heads != self.num_heads_kv)
        return self._out_proj(context.transpose(1, 2), x_mlp)

    def _attend_with_cache(self, q, k, v, kv_cache, positions):
        """Write k, v (batch, seqlen, num_heads_kv, head_dim) into kv_cache at positions (batch, seqlen),
        then attend from q (batch, seqlen, num_heads, head_dim) to every cached key at or before its own
        position. Returns the context (batch, num_heads, seqlen, head_dim)."""
        end = int(positions.max()) + 1
        if end > kv_cache.shape[1]:
            raise ValueError(f"inference_params: positions up to {end} do not fit the KV cache of "
                             f"max_seqlen {kv_cache.shape[1]}")
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        kv_cache[rows, positions, 0] = k.to(kv_cache.dtype)
        kv_cache[rows, positions, 1] = v.to(kv_cache.dtype)
        keys, values = kv_cache[:, :end].to(q.dtype).unbind(dim=2)  # (batch, end, num_heads_kv, head_dim)
        visible = torch.arange(end, device=q.device) <= positions[..., None]  # (batch, seqlen, end)
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible[:, None],
            scale=self.softmax_scale, enable_gqa=self.num_heads != self.num_heads_kv)

    def step(self, hidden_states: torch.Tensor, kv_cache: torch.Tensor, conv_state: torch.Tensor | None,
             cache_seqlens: torch.Tensor | int):
        """One decoding step. hidden_states: (batch, 1, embed_dim); cache_seqlens: tokens already cached,
        an int or a (batch,) LongTensor for rows of different lengths. The new key and value are written
        into kv_cache (batch, max_seqlen, 2, num_heads_kv, head_dim) at that position (conv_state
        (batch, qkv_dim, d_conv) updated in place); keys past each row's position are masked.
        Returns (out (batch, 1, embed_dim), kv_cache, conv_state)."""
        batch, seqlen, _ = hidden_states.shape
        if seqlen != 1:
            raise ValueError(f"hidden_states: step decodes one token, expected seqlen 1, got {seqlen}")
        qkv, x_mlp = self._in_proj(hidden_states)
        if self.d_conv > 0:
            qkv = causal_conv1d_update(qkv.squeeze(1), conv_state, self.conv1d.weight.squeeze(1),
                                       self.conv1d.bias).unsqueeze(1)
        q, k, v = self._split_heads(qkv)
        positions = _row_positions(cache_seqlens, batch, hidden_states.device)
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_cos_sin(positions[:, None], self.rotary_emb_dim, self.rotary_emb_base)
            q, k = (apply_rotary(t, cos, sin, self.rotary_emb_interleaved) for t in (q, k))
        rows = torch.arange(batch, device=hidden_states.device)
        kv_cache[rows, positions, 0] = k[:, 0].to(kv_cache.dtype)
        kv_cache[rows, positions, 1] = v[:, 0].to(kv_cache.dtype)
        keys, values = kv_cache.to(q.dtype).unbind(dim=2)  # (batch, max_seqlen, num_heads_kv, head_dim)
        visible = torch.arange(kv_cache.shape[1], device=hidden_states.device) <= positions[:, None]
        context = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible[:, None, None, :],
            scale=self.softmax_scale, enable_gqa=self.num_heads != self.num_heads_kv)
        return self._out_proj(context.transpose(1, 2), x_mlp), kv_cache, conv_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """(kv_cache (batch, max_seqlen, 2, num_heads_kv, head_dim), conv_state (batch, qkv_dim, d_conv) or None).

        Zeroed rather than empty: masked keys still enter the attention product, and garbage could be NaN.
        """
        dtype = self.out_proj.weight.dtype if dtype is None else dtype
        device = self.out_proj.weight.device
        kv_cache = torch.zeros(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, dtype=dtype, device=device)
        conv_state = None
        if self.d_conv > 0:
            conv_state = torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv, dtype=dtype, device=device)
        return kv_cache, conv_state

    def _in_proj(self, x: torch.Tensor):
        """(qkv, gated MLP output or None) from x (..., embed_dim)."""
        qkv = self.in_proj(x)
        if self.mlp_dim == 0:
            return qkv, None
        qkv, x_mlp = qkv.split([qkv.shape[-1] - self.mlp_dim, self.mlp_dim], dim=-1)
        up, gate = x_mlp.chunk(2, dim=-1)
        return qkv, up * F.silu(gate)

    def _split_heads(self, qkv: torch.Tensor):
        """q (batch, seqlen, num_heads, head_dim), k and v (batch, seqlen, num_heads_kv, head_dim)."""
        q, k, v = qkv.split([self.num_heads * self.head_dim] + [self.num_heads_kv * self.head_dim] * 2, dim=-1)
        return q.unflatten(-1, (self.num_heads, self.head_dim)), *(
            t.unflatten(-1, (self.num_heads_kv, self.head_dim)) for t in (k, v))

    def _out_proj(self, context: torch.Tensor, x_mlp: torch.Tensor | None) -> torch.Tensor:
        context = context.flatten(-2)
        if x_mlp is not None:
            context = torch.cat([context, x_mlp], dim=-1)
        return self.out_proj(context)


def _row_positions(cache_seqlens: torch.Tensor | int, batch: int, device) -> torch.Tensor:
    """(batch,) int64 tokens already cached per row, from an int or one length per row of a larger cache."""
    return torch.as_tensor(cache_seqlens, device=device).long().reshape(-1)[:batch].expand(batch)
