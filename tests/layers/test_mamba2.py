"""Mamba-2 layer: official parameter layout and init, forward against a float64 loop over time for
every option (d_ssm < d_inner, groups, per-channel D, norm on/off and order), decoding against the
parallel forward, packed sequences (seq_idx, cu_seqlens), gradients, errors."""
import pytest
import torch
import torch.nn.functional as F

from mambakit.layers import Mamba2

SMALL = dict(d_model=32, d_state=8, headdim=8, chunk_size=8)  # d_inner 64, 8 heads, chunks of 8
CONFIGS = {
    "default": {},
    "mlp_part": dict(d_ssm=32),
    "groups": dict(ngroups=2),
    "D_has_hdim": dict(D_has_hdim=True),
    "no_rmsnorm": dict(rmsnorm=False, ngroups=2),
    "norm_before_gate": dict(norm_before_gate=True, ngroups=4, d_ssm=32),
    "limits_bias": dict(dt_limit=(0.01, 0.05), conv_init=0.5, bias=True, conv_bias=False, d_conv=3),
}


def mamba2_reference(layer: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """Mamba-2 mixer in float64, step by step in time, from the layer's weights. x: (batch, L, d_model)."""
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    x = x.double()
    batch, length, _ = x.shape
    H, P, G, N = layer.nheads, layer.headdim, layer.ngroups, layer.d_state
    d_ssm, d_mlp = layer.d_ssm, layer.d_inner - layer.d_ssm
    proj = F.linear(x, w["in_proj.weight"], w.get("in_proj.bias"))
    z0, x0, z, xBC, dt = proj.split([d_mlp, d_mlp, d_ssm, d_ssm + 2 * G * N, H], dim=-1)
    conv = F.conv1d(xBC.transpose(1, 2), w["conv1d.weight"], w.get("conv1d.bias"), padding=layer.d_conv - 1,
                    groups=xBC.shape[-1])
    xBC = F.silu(conv[..., :length]).transpose(1, 2)
    xs = xBC[..., :d_ssm].reshape(batch, length, H, P)
    head_group = torch.arange(H) // (H // G)  # head h reads group h // (H / G)
    Bs = xBC[..., d_ssm:d_ssm + G * N].reshape(batch, length, G, N)[:, :, head_group]
    Cs = xBC[..., d_ssm + G * N:].reshape(batch, length, G, N)[:, :, head_group]
    dt = F.softplus(dt + w["dt_bias"])
    if layer.dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*layer.dt_limit)
    A = -torch.exp(w["A_log"])
    D = w["D"].reshape(H, P) if layer.D_has_hdim else w["D"][:, None]
    h = x.new_zeros(batch, H, P, N)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + \
            (dt[:, t, :, None] * xs[:, t])[..., None] * Bs[:, t, :, None, :]
        ys.append((h * Cs[:, t, :, None, :]).sum(-1) + D * xs[:, t])
    y = torch.stack(ys, dim=1).reshape(batch, length, d_ssm)
    if layer.rmsnorm:
        gate = F.silu(z)
        y = y if layer.norm_before_gate else y * gate
        grouped = y.reshape(batch, length, G, d_ssm // G)
        y = (grouped / torch.sqrt(grouped.square().mean(-1, keepdim=True) + 1e-5)).reshape_as(y) * w["norm.weight"]
        y = y * gate if layer.norm_before_gate else y
    else:
        y = y * F.silu(z)
    y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, w["out_proj.weight"], w.get("out_proj.bias"))


def make(config: dict, **kwargs) -> Mamba2:
    """A small Mamba2 with D and the norm scale moved off their constant inits."""
    layer = Mamba2(**{**SMALL, **config, **kwargs})
    with torch.no_grad():
        layer.D.normal_()
        if layer.rmsnorm:
            layer.norm.weight.normal_()
    return layer


def test_parameter_names_and_shapes_match_official():
    layer = Mamba2(d_model=64)  # official defaults: d_state 128, headdim 64 -> d_inner 128, 2 heads, conv_dim 384
    expected = {
        "dt_bias": (2,), "A_log": (2,), "D": (2,), "in_proj.weight": (2 * 128 + 2 * 128 + 2, 64),
        "conv1d.weight": (384, 1, 4), "conv1d.bias": (384,), "norm.weight": (128,), "out_proj.weight": (64, 128),
    }
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected
    mixed = Mamba2(d_model=64, d_state=16, headdim=16, d_ssm=64, ngroups=2, D_has_hdim=True, rmsnorm=False)
    shapes = {k: tuple(v.shape) for k, v in mixed.state_dict().items()}
    assert shapes["in_proj.weight"] == (2 * 128 + 2 * 2 * 16 + 4, 64)
    assert shapes["conv1d.weight"] == (64 + 2 * 2 * 16, 1, 4)
    assert shapes["D"] == (64,) and shapes["out_proj.weight"] == (64, 128) and "norm.weight" not in shapes


def test_initialisation():
    layer = Mamba2(d_model=256, d_state=16, headdim=4, A_init_range=(2, 8), dt_min=0.005, dt_max=0.05,
                   dtype=torch.bfloat16)  # 128 heads
    for p in (layer.dt_bias, layer.A_log, layer.D):
        assert p.dtype == torch.float32 and p._no_weight_decay
    assert layer.in_proj.weight.dtype == layer.norm.weight.dtype == torch.bfloat16
    A = -torch.exp(layer.A_log)
    assert A.min() >= -8 * (1 + 1e-6) and A.max() <= -2 * (1 - 1e-6) and A.std() > 0
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 0.005 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5) and dt.std() > 0
    assert torch.equal(layer.D, torch.ones(128))
    conv = Mamba2(d_model=32, d_state=8, headdim=8, conv_init=0.01)
    assert conv.conv1d.weight.abs().max() <= 0.01


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_float64_loop(name, rel):
    layer = make(CONFIGS[name])
    x = torch.randn(2, 21, 32)  # not a multiple of chunk_size
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel(out, mamba2_reference(layer, x)) < 1e-5


def test_long_odd_sequence_and_flat_input(rel):
    layer = Mamba2(d_model=32, d_state=16, headdim=16)
    x = torch.randn(2, 1000, 32)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    flat = layer(x.flatten(0, 1), seqlen=1000)
    assert flat.shape == (2000, 32) and rel(flat.view(2, 1000, 32), out) < 1e-6


@pytest.mark.parametrize("name", ["default", "mlp_part", "no_rmsnorm", "norm_before_gate", "D_has_hdim"])
def test_step_by_step_equals_parallel(name, rel):
    layer = make(CONFIGS[name])
    x = torch.randn(2, 9, 32)
    full = layer(x)
    conv_state, ssm_state = layer.allocate_inference_cache(2, 9)
    assert conv_state.shape == (2, layer.conv1d.weight.shape[0], 4)
    assert ssm_state.shape == (2, layer.nheads, 8, 8) and ssm_state.dtype == torch.float32
    with torch.no_grad():  # decoding runs without autograd
        steps = [layer.step(x[:, t:t + 1], conv_state, ssm_state)[0] for t in range(9)]
    assert rel(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("prefill", [3, 13])  # shorter than d_conv; longer than a chunk
def test_prefill_then_decode_equals_parallel(prefill, cache_params, rel):
    layer = make(CONFIGS["groups"], layer_idx=0)
    x = torch.randn(2, 17, 32)
    full = layer(x)
    params = cache_params(max_seqlen=17, max_batch_size=2)
    with torch.no_grad():
        outs = [layer(x[:, :prefill], inference_params=params)]
        for t in range(prefill, 17):
            params.seqlen_offset = t
            outs.append(layer(x[:, t:t + 1], inference_params=params))
    assert rel(torch.cat(outs, dim=1), full) < 1e-5


def pack(parts):
    """Concatenate (1, n_i, d) sequences; return them with seq_idx (1, total) and cu_seqlens."""
    lengths = torch.tensor([p.shape[1] for p in parts])
    seq_idx = torch.repeat_interleave(torch.arange(len(parts), dtype=torch.int32), lengths)[None]
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.cat(parts, dim=1), seq_idx, cu_seqlens


def test_packed_sequences_equal_separate_runs(rel):
    layer = make(CONFIGS["mlp_part"])
    parts = [torch.randn(1, n, 32) for n in (7, 2, 12)]
    packed, seq_idx, cu_seqlens = pack(parts)
    separate = torch.cat([layer(p) for p in parts], dim=1)
    assert rel(layer(packed, seq_idx=seq_idx), separate) < 1e-5
    assert rel(layer(packed, cu_seqlens=cu_seqlens), separate) < 1e-5


def test_packed_prefill_caches_each_sequence(cache_params, rel):
    layer = make(CONFIGS["groups"], layer_idx=1)
    parts = [torch.randn(1, n, 32) for n in (6, 2, 9)]
    packed, seq_idx, cu_seqlens = pack(parts)
    params = cache_params(max_seqlen=16, max_batch_size=3)
    with torch.no_grad():
        layer(packed, seq_idx=seq_idx, cu_seqlens=cu_seqlens, inference_params=params)
    conv_state, ssm_state = params.key_value_memory_dict[1]
    assert ssm_state.shape[0] == 3
    for i, part in enumerate(parts):
        alone = cache_params(max_seqlen=16, max_batch_size=1)
        with torch.no_grad():
            layer(part, inference_params=alone)
        conv_alone, ssm_alone = alone.key_value_memory_dict[1]
        assert rel(conv_state[i], conv_alone[0]) < 1e-6
        assert rel(ssm_state[i], ssm_alone[0]) < 1e-5


def test_gradients_reach_every_parameter():
    layer = make(CONFIGS["mlp_part"], bias=True, D_has_hdim=True)
    x = torch.randn(2, 10, 32, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in [("input", x), *layer.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(headdim=24), "headdim"),
    (dict(ngroups=3), "ngroups"),
    (dict(d_ssm=96), "d_ssm"),
    (dict(A_init_range=(0, 16)), "A_init_range"),
    (dict(expand=1.5), "expand"),
    (dict(d_state=0), "d_state"),
    (dict(process_group=object()), "process_group"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises((ValueError, NotImplementedError), match=match):
        Mamba2(**{**SMALL, **kwargs})
