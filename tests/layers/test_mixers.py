"""What every mixer shares: bf16 (built with dtype=bfloat16, fp32 weights loaded) stays within bf16
accuracy of fp32 in the parallel forward and in decoding (bf16 or fp32 cache), with A_log, D, dt_bias
kept fp32; a cache allocated for more rows than the batch serves the batch from its first rows."""
from functools import partial

import pytest
import torch

from mambakit.layers import MHA, Mamba, Mamba2

MIXERS = {
    "mamba": partial(Mamba, 32, d_state=8, layer_idx=0),
    "mamba2": partial(Mamba2, 32, d_state=8, headdim=8, chunk_size=8, layer_idx=0),
    "mha": partial(MHA, 32, 4, num_heads_kv=2, rotary_emb_dim=4, causal=True, layer_idx=0),
}
FP32_PARAMETERS = {"A_log", "D", "dt_bias"}


@pytest.mark.parametrize("cache_dtype", [None, torch.float32])
@pytest.mark.parametrize("name", MIXERS)
def test_bf16_layer_matches_fp32(name, cache_dtype, cache_params, rel):
    fp32 = MIXERS[name]()
    bf16 = MIXERS[name](dtype=torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    for pname, p in bf16.named_parameters():
        assert p.dtype == (torch.float32 if pname in FP32_PARAMETERS else torch.bfloat16), pname
    x = torch.randn(2, 12, 32)
    ref = fp32(x)
    out = bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    params = cache_params(max_seqlen=12, max_batch_size=2)
    params.key_value_memory_dict[0] = bf16.allocate_inference_cache(2, 12, dtype=cache_dtype)
    with torch.no_grad():
        outs = [bf16(x[:, :5].bfloat16(), inference_params=params)]
        for t in range(5, 12):
            params.seqlen_offset = t
            outs.append(bf16(x[:, t:t + 1].bfloat16(), inference_params=params))
    assert rel(torch.cat(outs, dim=1), ref) < 1e-2


@pytest.mark.parametrize("name", MIXERS)
def test_cache_with_spare_rows(name, cache_params, rel):
    layer = MIXERS[name]()
    x = torch.randn(2, 7, 32)
    full = layer(x)
    params = cache_params(max_seqlen=8, max_batch_size=4)
    params.key_value_memory_dict[0] = layer.allocate_inference_cache(4, 8)
    params.lengths_per_sample = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        outs = [layer(x[:, :3], inference_params=params)]
        params.lengths_per_sample += 3
        for t in range(3, 7):
            params.seqlen_offset = t
            outs.append(layer(x[:, t:t + 1], inference_params=params))
            params.lengths_per_sample += 1
    assert rel(torch.cat(outs, dim=1), full) < 1e-5
    assert all(s is None or s[2:].count_nonzero() == 0 for s in params.key_value_memory_dict[0])


def _decode_one(layer, states, x):
    """One decode step of `layer` from copies of `states` (conv_state, ssm_state) for x (batch, 1, d_model)."""
    with torch.no_grad():
        out, _, _ = layer.step(x, *(s.clone() for s in states))
    return out


@pytest.mark.parametrize("change", ["in_place", "replaced"])
@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_step_follows_a_changed_A_log(name, change):
    """The CPU step keeps A = -exp(A_log) between tokens; it must not outlive a change of A_log."""
    layer = MIXERS[name]()
    states = tuple(torch.randn_like(s) for s in layer.allocate_inference_cache(2, 1))
    x = torch.randn(2, 1, 32)
    before = _decode_one(layer, states, x)  # keeps A
    new_A_log = layer.A_log.detach() + torch.rand_like(layer.A_log)
    if change == "in_place":
        with torch.no_grad():
            layer.A_log.copy_(new_A_log)
    else:
        layer.A_log = torch.nn.Parameter(new_A_log)
    fresh = MIXERS[name]()
    fresh.load_state_dict(layer.state_dict())
    after = _decode_one(layer, states, x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _decode_one(fresh, states, x))


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_A_log_gets_gradients_after_inference(name):
    """A kept for inference (no autograd) must not stand in for A_log when gradients flow again."""
    layer = MIXERS[name]()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        layer(x)
    layer(x).square().sum().backward()
    assert layer.A_log.grad is not None and layer.A_log.grad.abs().sum() > 0
