"""Parity with Hugging Face `transformers` Mamba / Mamba-2: random tiny models, weights carried both ways."""
import pytest
import torch

from mambakit.models import MambaLMHeadModel

transformers = pytest.importorskip("transformers")


def hf_model(kind: str, tie: bool, randomize_):
    """A randomized tiny transformers model (vocab 77: not a multiple of 8) in eval mode."""
    common = dict(vocab_size=77, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, use_bias=True,
                  tie_word_embeddings=tie)
    if kind == "mamba1":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**common, conv_kernel=3, time_step_rank=5))
    else:
        # Two groups for B and C, and a dt clamp that bites on both sides.
        config = transformers.Mamba2Config(**common, num_heads=4, head_dim=16, n_groups=2, chunk_size=8,
                                           time_step_limit=(0.02, 0.3))
        model = transformers.Mamba2ForCausalLM(config)
    return randomize_(model).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("tie", [True, False])
def test_transformers_checkpoint_loads_with_the_same_logits(kind, tie, tmp_path, tiny):
    theirs = hf_model(kind, tie, tiny.randomize_)
    theirs.save_pretrained(tmp_path)
    ours = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    assert ours.config.tie_embeddings == tie and ours.config.padded_vocab_size == 77
    ids = torch.randint(0, 77, (2, 13))  # 13: not a multiple of the chunk size
    with torch.no_grad():
        logits = ours(ids).logits
    assert tiny.rel_err(logits, hf_logits(theirs, ids)) < 1e-4


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("tie", [True, False])
def test_our_hf_checkpoint_loads_in_transformers(kind, tie, tmp_path, tiny):
    ssm_cfg = tiny.CONFIGS[kind]["ssm_cfg"]
    if kind == "mamba2":
        ssm_cfg = {**ssm_cfg, "dt_limit": (0.02, 0.3), "bias": True}
    ours = tiny.build(kind, tie_embeddings=tie, ssm_cfg=ssm_cfg)  # vocab 101 padded to 104
    ours.save_pretrained(tmp_path, format="hf")
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs.eval()
    assert type(theirs).__name__ == {"mamba1": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}[kind]
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        logits = ours(ids).logits
    assert tiny.rel_err(hf_logits(theirs, ids), logits) < 1e-4
