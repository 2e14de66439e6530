"""Tiny random-weight language models of each kind, for generation tests."""
import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel

VOCAB = 257  # the byte tokenizer's; the embedding is padded to 264 rows

CONFIGS = {
    "mamba1": dict(ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "mamba2": dict(ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}),
    "hybrid": dict(
        ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8},
        attn_layer_idx=[1],
        attn_cfg={"num_heads": 4, "num_heads_kv": 2, "causal": True, "d_conv": 4, "rotary_emb_dim": 8},
        d_intermediate=64,
    ),
}


def tiny_model(kind: str, n_layer: int = 3, d_model: int = 32) -> MambaLMHeadModel:
    config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, tie_embeddings=False, **CONFIGS[kind])
    model = MambaLMHeadModel(config)
    # Spread the logits so that sampled and greedy tokens vary with the context.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


@pytest.fixture
def make_model():
    """tiny_model(kind, n_layer=3, d_model=32), kind in "mamba1", "mamba2", "hybrid"."""
    return tiny_model


@pytest.fixture
def vocab():
    return VOCAB
