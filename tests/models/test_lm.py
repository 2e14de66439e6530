import math

import pytest
import torch

import mambakit
from mambakit.generation import InferenceCache
from mambakit.models import MambaConfig, MambaLMHeadModel

KINDS = ["hybrid", "mamba1", "mamba2"]


def official_shapes(c: MambaConfig) -> dict:
    """The official checkpoint's keys and shapes for the tiny configs, written out from the papers' layout."""
    d, v = c.d_model, c.padded_vocab_size
    shapes = {"backbone.embedding.weight": (v, d), "backbone.norm_f.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(c.n_layer):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        if i in c.attn_layer_idx:
            h, hkv = c.attn_cfg["num_heads"], c.attn_cfg.get("num_heads_kv", c.attn_cfg["num_heads"])
            hd = d // h
            shapes |= {p + "mixer.in_proj.weight": ((h + 2 * hkv) * hd, d), p + "mixer.in_proj.bias": ((h + 2 * hkv) * hd,),
                       p + "mixer.out_proj.weight": (d, h * hd), p + "mixer.out_proj.bias": (d,)}
        elif c.ssm_layer == "Mamba1":
            n, w, inner, rank = c.ssm_cfg["d_state"], c.ssm_cfg["d_conv"], 2 * d, math.ceil(d / 16)
            shapes |= {p + "mixer.in_proj.weight": (2 * inner, d), p + "mixer.conv1d.weight": (inner, 1, w),
                       p + "mixer.conv1d.bias": (inner,), p + "mixer.x_proj.weight": (rank + 2 * n, inner),
                       p + "mixer.dt_proj.weight": (inner, rank), p + "mixer.dt_proj.bias": (inner,),
                       p + "mixer.A_log": (inner, n), p + "mixer.D": (inner,), p + "mixer.out_proj.weight": (d, inner)}
        else:
            n, g, inner = c.ssm_cfg["d_state"], c.ssm_cfg.get("ngroups", 1), 2 * d
            heads = inner // c.ssm_cfg["headdim"]
            shapes |= {p + "mixer.in_proj.weight": (2 * inner + 2 * g * n + heads, d),
                       p + "mixer.conv1d.weight": (inner + 2 * g * n, 1, 4), p + "mixer.conv1d.bias": (inner + 2 * g * n,),
                       p + "mixer.dt_bias": (heads,), p + "mixer.A_log": (heads,), p + "mixer.D": (heads,),
                       p + "mixer.norm.weight": (inner,), p + "mixer.out_proj.weight": (d, inner)}
        if c.d_intermediate:
            hidden = -(-c.d_intermediate // 128) * 128  # GatedMLP rounds up to a multiple of 128
            shapes |= {p + "norm2.weight": (d,), p + "mlp.fc1.weight": (2 * hidden, d), p + "mlp.fc2.weight": (d, hidden)}
    return shapes


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_matches_official_layout(kind, tiny):
    model = tiny.build(kind)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(model.config)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_and_num_last_tokens(kind, tiny):
    model = tiny.build(kind)
    ids = tiny.random_ids(model, batch=3, seqlen=11)
    with torch.no_grad():
        out = model(ids)
        last = model(ids, num_last_tokens=4)
    assert type(out).__name__ == "CausalLMOutput"
    assert out.logits.shape == (3, 11, model.config.padded_vocab_size)
    assert torch.isfinite(out.logits).all()
    assert tiny.rel_err(last.logits, out.logits[:, -4:]) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_causal(kind, tiny):
    # Changing token t changes no logits before t, and does change those from t on.
    model = tiny.build(kind)
    ids = tiny.random_ids(model, batch=1, seqlen=12)
    t = 7
    other = ids.clone()
    other[0, t] = (ids[0, t] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    assert tiny.rel_err(b[:, :t], a[:, :t]) < 1e-6
    assert tiny.rel_err(b[:, t:], a[:, t:]) > 1e-4


def test_tied_and_untied_head(tiny):
    tied = tiny.build("mamba1")
    assert tied.lm_head.weight is tied.backbone.embedding.weight
    untied = tiny.build("mamba1", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    assert not torch.equal(untied.lm_head.weight, untied.backbone.embedding.weight)


def test_hidden_states_come_from_the_last_layers_output(tiny):
    # logits = lm_head(norm_f(residual stream)): recompute the head from the backbone by hand.
    model = tiny.build("mamba2", tie_embeddings=False)
    ids = tiny.random_ids(model)
    with torch.no_grad():
        hidden = model.backbone(ids)
        logits = model(ids).logits
    assert tiny.rel_err(logits, hidden @ model.lm_head.weight.T) < 1e-6


@pytest.mark.parametrize("bad, error, message", [
    (lambda ids: ids.float(), TypeError, "input_ids"),
    (lambda ids: ids[0], ValueError, "input_ids"),
    (lambda ids: ids[:, :0], ValueError, "input_ids"),
    (lambda ids: torch.where(ids == ids[0, 3], 104, ids), ValueError, "104"),
    (lambda ids: torch.where(ids == ids[1, 2], -1, ids), ValueError, "-1"),
    (lambda ids: ids.tolist(), TypeError, "input_ids"),
])
def test_bad_input_ids(bad, error, message, tiny):
    model = tiny.build("mamba1")  # 101 tokens, 104 embedding rows
    ids = tiny.random_ids(model)
    with pytest.raises(error, match=message):
        model(bad(ids))


def test_bad_num_last_tokens(tiny):
    model = tiny.build("mamba1")
    with pytest.raises(ValueError, match="num_last_tokens"):
        model(tiny.random_ids(model), num_last_tokens=-2)


def test_bad_constructor_arguments(tiny):
    with pytest.raises(TypeError, match="config"):
        MambaLMHeadModel({"d_model": 8})
    config = MambaConfig(**tiny.CONFIGS["mamba1"])
    config.n_layer = 0  # edited after construction: caught when the model is built
    with pytest.raises(ValueError, match="n_layer"):
        MambaLMHeadModel(config)
    with pytest.raises(ValueError, match="init_std"):
        MambaLMHeadModel(MambaConfig(**tiny.CONFIGS["mamba1"]), initializer_cfg={"init_std": 0.1})


@pytest.mark.parametrize("d_intermediate", [0, 256])
def test_init(d_intermediate):
    n_layer, d = 4, 64
    config = MambaConfig(d_model=d, n_layer=n_layer, vocab_size=512, d_intermediate=d_intermediate,
                         attn_layer_idx=[1], attn_cfg={"num_heads": 4}, ssm_cfg={"d_state": 4})
    model = MambaLMHeadModel(config)
    emb = model.backbone.embedding.weight
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    n_residuals = 2 if d_intermediate else 1
    for name, p in model.named_parameters():
        if name.endswith(("out_proj.weight", "fc2.weight")):
            # Kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in)) divided by sqrt(n_residuals * n_layer).
            bound = 1 / math.sqrt(p.shape[1]) / math.sqrt(n_residuals * n_layer)
            assert p.abs().max() <= bound * (1 + 1e-6), name
            assert abs(p.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), name
    attention = model.backbone.layers[1].mixer
    assert torch.count_nonzero(attention.in_proj.bias) == 0 and torch.count_nonzero(attention.out_proj.bias) == 0
    dt_bias = model.backbone.layers[0].mixer.dt_proj.bias  # flagged _no_reinit: keeps its dt init
    assert (torch.nn.functional.softplus(dt_bias) > 0.0009).all() and (torch.nn.functional.softplus(dt_bias) < 0.11).all()


def test_initializer_cfg_range(tiny):
    config = MambaConfig(**tiny.CONFIGS["mamba1"])
    config.vocab_size = 4096
    model = MambaLMHeadModel(config, initializer_cfg={"initializer_range": 0.05, "rescale_prenorm_residual": False})
    assert abs(model.backbone.embedding.weight.std().item() - 0.05) < 0.003


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_with_the_cache_matches_the_parallel_forward(kind, tiny):
    model = tiny.build(kind)
    ids = tiny.random_ids(model, batch=2, seqlen=10)
    prompt = 6
    with torch.no_grad():
        full = model(ids).logits
        cache = InferenceCache.allocate(model, batch_size=2, max_seqlen=10)
        assert sorted(cache.key_value_memory_dict) == list(range(model.config.n_layer))
        logits = [model(ids[:, :prompt], inference_params=cache).logits]
        cache.seqlen_offset += prompt
        cache.lengths_per_sample += prompt
        for t in range(prompt, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], inference_params=cache).logits)
            cache.seqlen_offset += 1
            cache.lengths_per_sample += 1
    assert tiny.rel_err(torch.cat(logits, dim=1), full) < 1e-4


def test_allocate_inference_cache_shapes(tiny):
    model = tiny.build("hybrid")
    states = model.allocate_inference_cache(batch_size=3, max_seqlen=16)
    assert sorted(states) == [0, 1, 2]
    conv, ssm = states[0]
    assert conv.shape == (3, 64 + 2 * 8, 4) and ssm.shape == (3, 4, 16, 8) and ssm.dtype == torch.float32
    assert states[1][0].shape == (3, 16, 2, 2, 8)  # (batch, max_seqlen, k/v, heads_kv, head_dim)


def test_package_exports():
    for name in ("Mamba", "Mamba2", "MHA", "GatedMLP", "Block", "MambaConfig", "MambaLMHeadModel",
                 "selective_scan_fn", "mamba_chunk_scan_combined", "causal_conv1d_fn", "rms_norm"):
        assert hasattr(mambakit, name), name
    assert mambakit.MambaLMHeadModel is MambaLMHeadModel


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_model_tracks_float32(kind, tiny):
    # Same (bf16-representable) weights in a bf16 and an fp32 model; SSM parameters stay fp32 in both.
    config = MambaConfig(**tiny.CONFIGS[kind])
    half = tiny.randomize_(MambaLMHeadModel(config, dtype=torch.bfloat16)).eval()
    assert half.backbone.embedding.weight.dtype == torch.bfloat16
    full = MambaLMHeadModel(config).eval()
    full.load_state_dict(half.state_dict())
    ids = tiny.random_ids(full, seqlen=33)
    with torch.no_grad():
        out, ref = half(ids).logits, full(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Every layer rounds its activations to bf16 (each alone ~4e-3), the logits once more.
    assert tiny.rel_err(out.float(), ref) < 2e-2
