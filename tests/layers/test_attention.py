"""MHA: official parameter layout, forward against a float64 attention written with complex-number
rotary embeddings, KV-cache decoding (GQA, rotary, conv, ragged rows) against the parallel forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.layers import MHA

CONFIGS = {
    "plain": dict(num_heads=4, causal=True),
    "gqa_rotary": dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, causal=True),
    "mqa_interleaved": dict(num_heads=4, num_heads_kv=1, rotary_emb_dim=6, rotary_emb_interleaved=True,
                            causal=True, rotary_emb_base=500.0),
    "mlp_conv": dict(num_heads=2, mlp_dim=40, d_conv=3, causal=True, qkv_proj_bias=False),
    "head_dim_scale": dict(num_heads=3, head_dim=5, softmax_scale=0.3, causal=True, out_proj_bias=False),
    "bidirectional": dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=2),
}


def rotate(t: torch.Tensor, positions: torch.Tensor, dim: int, base: float, interleaved: bool) -> torch.Tensor:
    """Rotary embedding as complex multiplication. t: (batch, L, heads, head_dim); positions: (batch, L)."""
    half = dim // 2
    if interleaved:
        pairs = torch.complex(t[..., 0:dim:2], t[..., 1:dim:2])
    else:
        pairs = torch.complex(t[..., :half], t[..., half:dim])
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    turned = pairs * torch.polar(torch.ones_like(theta), positions[..., None, None].double() * theta)
    parts = [turned.real, turned.imag]
    rotated = torch.stack(parts, dim=-1).flatten(-2) if interleaved else torch.cat(parts, dim=-1)
    return torch.cat([rotated, t[..., dim:]], dim=-1)


def mha_reference(layer: MHA, x: torch.Tensor) -> torch.Tensor:
    """Attention in float64 from the layer's weights, one explicit softmax. x: (batch, L, embed_dim)."""
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    x = x.double()
    batch, length, _ = x.shape
    H, Hkv, d = layer.num_heads, layer.num_heads_kv, layer.head_dim
    proj = F.linear(x, w["in_proj.weight"], w.get("in_proj.bias"))
    qkv, mlp = proj[..., :d * (H + 2 * Hkv)], proj[..., d * (H + 2 * Hkv):]
    if layer.d_conv:
        conv = F.conv1d(qkv.transpose(1, 2), w["conv1d.weight"], w["conv1d.bias"], padding=layer.d_conv - 1,
                        groups=qkv.shape[-1])
        qkv = conv[..., :length].transpose(1, 2)
    q = qkv[..., :H * d].reshape(batch, length, H, d)
    k = qkv[..., H * d:(H + Hkv) * d].reshape(batch, length, Hkv, d)
    v = qkv[..., (H + Hkv) * d:].reshape(batch, length, Hkv, d)
    if layer.rotary_emb_dim:
        positions = torch.arange(length).expand(batch, length)
        q, k = (rotate(t, positions, layer.rotary_emb_dim, layer.rotary_emb_base, layer.rotary_emb_interleaved)
                for t in (q, k))
    kv_head = torch.arange(H) // (H // Hkv)
    k, v = k[:, :, kv_head], v[:, :, kv_head]
    scale = layer.softmax_scale or 1 / math.sqrt(d)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if layer.causal:
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    context = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(-2)
    if mlp.shape[-1]:
        up, gate = mlp.chunk(2, dim=-1)
        context = torch.cat([context, up * F.silu(gate)], dim=-1)
    return F.linear(context, w["out_proj.weight"], w.get("out_proj.bias"))


def test_parameter_names_and_shapes_match_official():
    layer = MHA(64, 4)
    expected = {"in_proj.weight": (192, 64), "in_proj.bias": (192,), "out_proj.weight": (64, 64),
                "out_proj.bias": (64,)}
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected
    hybrid = MHA(64, 8, num_heads_kv=2, mlp_dim=100, d_conv=4, qkv_proj_bias=False, rotary_emb_dim=4)
    # head_dim 8, qkv 8 * (8 + 2 * 2) = 96, mlp_dim rounded up to 256 (half of it enters out_proj)
    expected = {"in_proj.weight": (96 + 256, 64), "conv1d.weight": (96, 1, 4), "conv1d.bias": (96,),
                "out_proj.weight": (64, 64 + 128), "out_proj.bias": (64,)}
    assert {k: tuple(v.shape) for k, v in hybrid.state_dict().items()} == expected
    assert MHA(64, 4).causal is False  # the official default


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_float64_reference(name, rel):
    layer = MHA(24, **CONFIGS[name])
    x = torch.randn(2, 13, 24)
    out = layer(x)
    assert out.shape == x.shape
    assert rel(out, mha_reference(layer, x)) < 1e-5


@pytest.mark.parametrize("name", ["plain", "gqa_rotary", "mqa_interleaved", "mlp_conv"])
def test_prefill_then_decode_equals_parallel(name, cache_params, rel):
    layer = MHA(24, **CONFIGS[name], layer_idx=2)
    x = torch.randn(3, 10, 24)
    full = layer(x)
    params = cache_params(max_seqlen=12, max_batch_size=3)
    with torch.no_grad():
        outs = [layer(x[:, :4], inference_params=params)]
        for t in range(4, 10):
            params.seqlen_offset = t
            outs.append(layer(x[:, t:t + 1], inference_params=params))
    kv_cache, conv_state = params.key_value_memory_dict[2]
    assert kv_cache.shape == (3, 12, 2, layer.num_heads_kv, layer.head_dim)
    assert (conv_state is None) == (layer.d_conv == 0)
    assert rel(torch.cat(outs, dim=1), full) < 1e-5


def test_ragged_rows_decode_at_their_own_lengths(cache_params, rel):
    """Row 1 holds a 3-token prompt right-padded to 5; decoding at lengths_per_sample must ignore the padding."""
    layer = MHA(24, **CONFIGS["gqa_rotary"], layer_idx=0)
    prompts = torch.randn(2, 5, 24)
    new = torch.randn(2, 4, 24)
    lengths = torch.tensor([5, 3])
    params = cache_params(max_seqlen=9, max_batch_size=2)
    with torch.no_grad():
        layer(prompts, inference_params=params)
        outs = []
        for i in range(4):
            params.seqlen_offset, params.lengths_per_sample = 5 + i, lengths + i
            outs.append(layer(new[:, i:i + 1], inference_params=params))
    outs = torch.cat(outs, dim=1)
    for row, n in enumerate(lengths.tolist()):
        alone = layer(torch.cat([prompts[row:row + 1, :n], new[row:row + 1]], dim=1))
        assert rel(outs[row], alone[0, n:]) < 1e-5


def test_gradients_reach_every_parameter():
    layer = MHA(24, **CONFIGS["mlp_conv"])
    x = torch.randn(2, 7, 24, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in [("input", x), *layer.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=4, num_heads_kv=3), "num_heads_kv"),
    (dict(num_heads=5), "num_heads"),
    (dict(num_heads=4, rotary_emb_dim=3), "rotary_emb_dim"),
    (dict(num_heads=4, rotary_emb_dim=8), "rotary_emb_dim"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MHA(24, **kwargs)


def test_decoding_needs_layer_idx(cache_params):
    with pytest.raises(ValueError, match="layer_idx"):
        MHA(24, 4)(torch.randn(1, 3, 24), inference_params=cache_params(max_seqlen=3, max_batch_size=1))
