"""Mamba (v1) layer: official parameter layout and init, forward against a float64 loop over time,
decoding (step and cache prefill) against the parallel forward, packed sequences, gradients, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.layers import Mamba


def mamba_reference(layer: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Mamba-1 mixer in float64, step by step in time, from the layer's weights. x: (batch, L, d_model)."""
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    x = x.double()
    d_inner, n, rank, width = layer.d_inner, layer.d_state, layer.dt_rank, layer.d_conv
    xz = F.linear(x, w["in_proj.weight"], w.get("in_proj.bias"))
    xs, z = xz[..., :d_inner], xz[..., d_inner:]
    conv = F.conv1d(xs.transpose(1, 2), w["conv1d.weight"], w["conv1d.bias"], padding=width - 1, groups=d_inner)
    xs = F.silu(conv[..., : x.shape[1]]).transpose(1, 2)  # (batch, L, d_inner)
    proj = xs @ w["x_proj.weight"].T
    dt = F.softplus(proj[..., :rank] @ w["dt_proj.weight"].T + w["dt_proj.bias"])
    Bs, Cs = proj[..., rank:rank + n], proj[..., rank + n:]
    A = -torch.exp(w["A_log"])
    h = x.new_zeros(x.shape[0], d_inner, n)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xs[:, t])[:, :, None] * Bs[:, t, None, :]
        ys.append((h * Cs[:, t, None, :]).sum(-1) + w["D"] * xs[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return F.linear(y, w["out_proj.weight"], w.get("out_proj.bias"))


def randomized(layer: Mamba) -> Mamba:
    """Move D away from its all-ones init so that a wrong skip path cannot pass."""
    with torch.no_grad():
        layer.D.normal_()
    return layer


def test_parameter_names_and_shapes_match_official():
    layer = Mamba(d_model=16)
    expected = {  # mamba_ssm Mamba(16): d_inner 32, d_state 16, dt_rank ceil(16/16) = 1, d_conv 4
        "A_log": (32, 16), "D": (32,), "in_proj.weight": (64, 16), "conv1d.weight": (32, 1, 4),
        "conv1d.bias": (32,), "x_proj.weight": (1 + 2 * 16, 32), "dt_proj.weight": (32, 1),
        "dt_proj.bias": (32,), "out_proj.weight": (16, 32),
    }
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected
    wide = Mamba(d_model=40, d_state=8, d_conv=3, expand=3, bias=True, conv_bias=False)
    shapes = {k: tuple(v.shape) for k, v in wide.state_dict().items()}
    assert shapes["x_proj.weight"] == (math.ceil(40 / 16) + 16, 120)
    assert shapes["in_proj.bias"] == (240,) and shapes["out_proj.bias"] == (40,)
    assert "conv1d.bias" not in shapes


def test_initialisation(rel):
    dt_min, dt_max = 0.002, 0.05
    layer = Mamba(d_model=64, d_state=8, dt_min=dt_min, dt_max=dt_max, dtype=torch.bfloat16)
    assert layer.A_log.dtype == layer.D.dtype == torch.float32
    assert layer.in_proj.weight.dtype == torch.bfloat16
    s4d_real = torch.arange(1, 9, dtype=torch.float32).expand(layer.d_inner, 8)
    assert torch.allclose(torch.exp(layer.A_log), s4d_real, rtol=1e-6)
    assert torch.equal(layer.D, torch.ones(layer.d_inner))
    dt = F.softplus(layer.dt_proj.bias.float())
    assert dt.min() >= dt_min * 0.97 and dt.max() <= dt_max * 1.03  # the bf16 bias is off by up to 1.6% in dt
    assert dt.std() > 0  # random, not constant
    bound = layer.dt_rank**-0.5
    assert layer.dt_proj.weight.float().abs().max() <= bound * 1.01
    assert layer.A_log._no_weight_decay and layer.D._no_weight_decay
    constant = Mamba(d_model=32, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(constant.dt_proj.weight, torch.full_like(constant.dt_proj.weight, 2.0 * 2**-0.5))


@pytest.mark.parametrize("config", [dict(), dict(d_state=4, d_conv=2, expand=1, dt_rank=3, bias=True)])
def test_forward_matches_float64_loop(config, rel):
    layer = randomized(Mamba(d_model=12, **config))
    x = torch.randn(2, 23, 12)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel(out, mamba_reference(layer, x)) < 1e-5


def test_step_by_step_equals_parallel(rel):
    layer = randomized(Mamba(d_model=16, d_state=8))
    x = torch.randn(3, 11, 16)
    full = layer(x)
    conv_state, ssm_state = layer.allocate_inference_cache(3, 11)
    assert conv_state.shape == (3, 32, 4) and ssm_state.shape == (3, 32, 8) and ssm_state.dtype == torch.float32
    with torch.no_grad():  # decoding runs without autograd
        steps = [layer.step(x[:, t:t + 1], conv_state, ssm_state)[0] for t in range(11)]
    assert rel(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("prefill", [2, 7])  # shorter and longer than d_conv
def test_prefill_then_decode_equals_parallel(prefill, cache_params, rel):
    layer = randomized(Mamba(d_model=16, d_state=8, layer_idx=3))
    x = torch.randn(2, 12, 16)
    full = layer(x)
    params = cache_params(max_seqlen=12, max_batch_size=2)
    with torch.no_grad():
        outs = [layer(x[:, :prefill], inference_params=params)]
        assert set(params.key_value_memory_dict) == {3}
        for t in range(prefill, 12):
            params.seqlen_offset = t
            outs.append(layer(x[:, t:t + 1], inference_params=params))
    assert rel(torch.cat(outs, dim=1), full) < 1e-5


def test_packed_sequences_equal_separate_runs(rel):
    layer = randomized(Mamba(d_model=16, d_state=8))
    lengths = [5, 1, 9]
    parts = [torch.randn(1, n, 16) for n in lengths]
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    packed = layer(torch.cat(parts, dim=1), seq_idx=seq_idx)
    separate = torch.cat([layer(p) for p in parts], dim=1)
    assert rel(packed, separate) < 1e-5


def test_packed_prefill_then_decode_continues_the_last_sequence(cache_params, rel):
    layer = randomized(Mamba(d_model=16, d_state=8, layer_idx=0))
    earlier, last, new = torch.randn(1, 6, 16), torch.randn(1, 2, 16), torch.randn(1, 3, 16)  # last < d_conv
    seq_idx = torch.tensor([[0] * 6 + [1] * 2], dtype=torch.int32)
    params = cache_params(max_seqlen=11, max_batch_size=1)
    with torch.no_grad():
        layer(torch.cat([earlier, last], dim=1), inference_params=params, seq_idx=seq_idx)
        outs = []
        for t in range(3):
            params.seqlen_offset = 8 + t
            outs.append(layer(new[:, t:t + 1], inference_params=params))
    alone = layer(torch.cat([last, new], dim=1))[:, 2:]
    assert rel(torch.cat(outs, dim=1), alone) < 1e-5


def test_gradients_reach_every_parameter():
    layer = randomized(Mamba(d_model=16, d_state=8, bias=True))
    x = torch.randn(2, 9, 16, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in [("input", x), *layer.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bad_arguments_raise(cache_params):
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="normal")
    with pytest.raises(ValueError, match="d_state"):
        Mamba(16, d_state=0)
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(16, dt_min=0.1, dt_max=0.01)
    layer = Mamba(16)  # no layer_idx
    with pytest.raises(ValueError, match="layer_idx"):
        layer(torch.randn(1, 3, 16), inference_params=cache_params(max_seqlen=3, max_batch_size=1))
    with pytest.raises(ValueError, match="seqlen 1"):
        layer.step(torch.randn(1, 2, 16), *layer.allocate_inference_cache(1, 2))
