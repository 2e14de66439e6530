"""Tiny model configs and helpers shared by the model tests, handed out by the `tiny` fixture."""
from types import SimpleNamespace

import pytest
import torch

from mambakit.bench.common import rel_err
from mambakit.models import MambaConfig, MambaLMHeadModel

MAMBA1 = dict(d_model=32, n_layer=2, vocab_size=101, ssm_cfg={"d_state": 8, "d_conv": 3})
MAMBA2 = dict(d_model=32, n_layer=2, vocab_size=101,
              ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8})
HYBRID = dict(d_model=32, n_layer=3, vocab_size=101, d_intermediate=48, attn_layer_idx=[1],
              attn_cfg={"num_heads": 4, "num_heads_kv": 2, "causal": True, "rotary_emb_dim": 8},
              ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8})
CONFIGS = {"mamba1": MAMBA1, "mamba2": MAMBA2, "hybrid": HYBRID}


def randomize_(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter, so that ones, zeros and structured inits cannot hide a wrong mapping."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def build(kind: str, **overrides) -> MambaLMHeadModel:
    """A randomized tiny MambaLMHeadModel in eval mode."""
    return randomize_(MambaLMHeadModel(MambaConfig(**{**CONFIGS[kind], **overrides}))).eval()


def random_ids(model: MambaLMHeadModel, batch: int = 2, seqlen: int = 13) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, seqlen))


@pytest.fixture
def tiny():
    """Helpers: tiny.build(kind, **overrides), tiny.randomize_, tiny.rel_err, tiny.random_ids, tiny.CONFIGS."""
    return SimpleNamespace(CONFIGS=CONFIGS, build=build, randomize_=randomize_, rel_err=rel_err, random_ids=random_ids)
