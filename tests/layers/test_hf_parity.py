"""The official layout is also the Hugging Face mixers' layout: our state dicts load strictly into
transformers' MambaMixer / Mamba2Mixer, and both compute the same output on random weights."""
import math

import pytest
import torch

from mambakit.layers import Mamba, Mamba2

transformers = pytest.importorskip("transformers")


def test_mamba_matches_transformers_mixer(rel):
    from transformers.models.mamba.modeling_mamba import MambaMixer
    ours = Mamba(32, d_state=8, d_conv=3)
    with torch.no_grad():
        ours.D.normal_()
    config = transformers.MambaConfig(hidden_size=32, state_size=8, expand=2, conv_kernel=3,
                                      time_step_rank=math.ceil(32 / 16), use_bias=False, use_conv_bias=True)
    theirs = MambaMixer(config, layer_idx=0)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 19, 32)
    with torch.no_grad():
        assert rel(ours(x), theirs(x)) < 1e-5


def test_mamba2_matches_transformers_mixer(rel):
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    ours = Mamba2(32, d_state=8, headdim=8, ngroups=2, chunk_size=8)
    with torch.no_grad():
        ours.D.normal_()
        ours.norm.weight.normal_()
    config = transformers.Mamba2Config(hidden_size=32, state_size=8, head_dim=8, num_heads=8, n_groups=2, expand=2,
                                       chunk_size=8, conv_kernel=4, use_bias=False, use_conv_bias=True,
                                       layer_norm_epsilon=1e-5)
    theirs = Mamba2Mixer(config, layer_idx=0)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        assert rel(ours(x), theirs(x)) < 1e-5
