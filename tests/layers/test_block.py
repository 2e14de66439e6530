"""GatedMLP and the residual Block: official shapes and structure, fused add+norm equal to the
unfused path, fp32 residual, mixer arguments and the cache passed through."""
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambakit.layers import Block, GatedMLP, Mamba, Mamba2
from mambakit.ops import RMSNorm


class LinearMixer(nn.Linear):
    """A mixer with the mixer call signature, simple enough to recompute by hand."""

    def forward(self, x, inference_params=None):
        return super().forward(x)


def test_gated_mlp_shapes_and_math(rel):
    mlp = GatedMLP(64)  # hidden int(8 * 64 / 3) = 170, rounded up to 256
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {"fc1.weight": (512, 64),
                                                                        "fc2.weight": (64, 256)}
    mlp = GatedMLP(48, hidden_features=100, out_features=16, multiple_of=64, bias=True, activation=torch.tanh)
    assert mlp.fc1.weight.shape == (256, 48) and mlp.fc2.weight.shape == (16, 128) and mlp.fc2.bias is not None
    x = torch.randn(3, 5, 48)
    hidden = x @ mlp.fc1.weight.T + mlp.fc1.bias
    expected = (hidden[..., :128] * torch.tanh(hidden[..., 128:])) @ mlp.fc2.weight.T + mlp.fc2.bias
    assert rel(mlp(x), expected) < 1e-6


def test_block_structure(rel):
    dim = 16
    block = Block(dim, partial(LinearMixer, out_features=dim), partial(GatedMLP, hidden_features=32))
    with torch.no_grad():
        for norm in (block.norm, block.norm2):
            norm.weight.normal_()
            norm.bias.normal_()
    h, r = torch.randn(2, 7, dim), torch.randn(2, 7, dim)
    out, residual = block(h, r)
    after_mixer = block.mixer(F.layer_norm(h + r, (dim,), block.norm.weight, block.norm.bias)) + h + r
    assert rel(residual, after_mixer) < 1e-6
    assert rel(out, block.mlp(F.layer_norm(after_mixer, (dim,), block.norm2.weight, block.norm2.bias))) < 1e-6
    first, first_residual = block(h)  # the first block of a model gets no residual
    assert rel(first_residual, block.mixer(block.norm(h)) + h) < 1e-6
    assert Block(dim, partial(LinearMixer, out_features=dim), nn.Identity).mlp is None


@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_norm_equals_unfused(residual_in_fp32, dtype, rel):
    dim = 32
    make = partial(Block, dim, partial(LinearMixer, out_features=dim, dtype=dtype),
                   partial(GatedMLP, hidden_features=48, dtype=dtype),
                   norm_cls=partial(RMSNorm, dtype=dtype, eps=1e-5), residual_in_fp32=residual_in_fp32)
    unfused, fused = make(fused_add_norm=False), make(fused_add_norm=True)
    with torch.no_grad():
        unfused.norm.weight.normal_()
    fused.load_state_dict(unfused.state_dict())
    h = torch.randn(2, 9, dim, dtype=dtype)
    r = torch.randn(2, 9, dim, dtype=torch.float32 if residual_in_fp32 else dtype)
    (out_u, res_u), (out_f, res_f) = unfused(h, r), fused(h, r)
    assert res_u.dtype == res_f.dtype == (torch.float32 if residual_in_fp32 else dtype)
    assert out_u.dtype == out_f.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(res_f, res_u) < tol and rel(out_f, out_u) < tol


def test_fused_add_norm_needs_a_known_norm():
    with pytest.raises(ValueError, match="norm_cls"):
        Block(8, partial(LinearMixer, out_features=8), nn.Identity, norm_cls=lambda d: nn.GroupNorm(1, d),
              fused_add_norm=True)


def test_block_passes_cache_and_mixer_arguments(cache_params, rel):
    block = Block(16, partial(Mamba2, d_state=8, headdim=8, layer_idx=5), nn.Identity, norm_cls=RMSNorm,
                  fused_add_norm=True, residual_in_fp32=True)
    conv_state, ssm_state = block.allocate_inference_cache(2, 10)
    assert ssm_state.shape == (2, 4, 8, 8)
    parts = [torch.randn(1, n, 16) for n in (4, 6)]
    seq_idx = torch.tensor([[0] * 4 + [1] * 6], dtype=torch.int32)
    packed, _ = block(torch.cat(parts, dim=1), seq_idx=seq_idx)
    separate = torch.cat([block(p)[0] for p in parts], dim=1)
    assert rel(packed, separate) < 1e-5

    block = Block(16, partial(Mamba, d_state=4, layer_idx=0), nn.Identity, norm_cls=RMSNorm)
    x = torch.randn(2, 6, 16)
    full, _ = block(x)
    params = cache_params(max_seqlen=6, max_batch_size=2)
    with torch.no_grad():
        outs = [block(x[:, :3], inference_params=params)[0]]
        for t in range(3, 6):
            params.seqlen_offset = t
            outs.append(block(x[:, t:t + 1], inference_params=params)[0])
    assert rel(torch.cat(outs, dim=1), full) < 1e-5


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_decode_step_with_the_norm_fused_into_the_projections(layer, monkeypatch):
    """On the Triton path (the interpreter here), a decode step runs the block's add + norm inside the
    mixer's in_proj, the conv step as its epilogue, Mamba-2's gated norm inside out_proj (Mamba-1's x_proj
    and out_proj in the same kernel without norm): the logits
    match the unfused step's."""
    from mambakit import MambaConfig, MambaLMHeadModel
    from mambakit.layers import block as block_module
    from mambakit.layers import mamba2 as mamba2_module
    from mambakit.ops import norm_linear
    from mambakit.ops.norm_linear import triton_decode

    pytest.importorskip("triton")
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    ssm_cfg = {"layer": layer, **({"headdim": 16, "chunk_size": 8} if layer == "Mamba2" else {})}
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=97, ssm_cfg=ssm_cfg, rms_norm=True, fused_add_norm=True,
                         residual_in_fp32=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MambaLMHeadModel(config, device=device).eval()
    ids = torch.randint(0, 97, (2, 5), device=device)

    def scores():
        out = model.generate(ids, 8, cg=False, output_scores=True, return_dict_in_generate=True)
        return torch.stack(out.scores)

    fused_calls = []
    fused = triton_decode.norm_linear
    monkeypatch.setattr(triton_decode, "norm_linear", lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    got = scores()
    per_step = 2 * (2 if layer == "Mamba2" else 3)  # per layer: in_proj, out_proj (Mamba-1: x_proj too)
    assert len(fused_calls) == 2 * per_step  # steps 2 and 3 (the first token comes from the prefill)
    for module in (block_module, mamba2_module, norm_linear):
        monkeypatch.setattr(module, "fusable_linear", lambda *a: False)
    want = scores()
    assert ((got - want).norm() / want.norm()).item() < 1e-5
