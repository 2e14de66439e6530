import json
import math

import pytest

from mambakit.models import MambaConfig


def test_defaults_are_the_official_ones():
    c = MambaConfig()
    assert (c.d_model, c.d_intermediate, c.n_layer, c.vocab_size) == (2560, 0, 64, 50277)
    assert (c.ssm_cfg, c.attn_layer_idx, c.attn_cfg) == ({}, [], {})
    assert c.rms_norm and c.residual_in_fp32 and c.fused_add_norm and c.tie_embeddings
    assert c.pad_vocab_size_multiple == 8
    assert c.padded_vocab_size == 50280


def test_mutable_defaults_are_not_shared():
    a, b = MambaConfig(), MambaConfig()
    a.ssm_cfg["d_state"] = 4
    a.attn_layer_idx.append(0)
    assert b.ssm_cfg == {} and b.attn_layer_idx == []


@pytest.mark.parametrize("vocab, multiple, padded", [(101, 8, 104), (104, 8, 104), (7, 1, 7), (50277, 16, 50288)])
def test_padded_vocab_size(vocab, multiple, padded):
    assert MambaConfig(vocab_size=vocab, pad_vocab_size_multiple=multiple).padded_vocab_size == padded


def test_json_round_trip(tmp_path):
    c = MambaConfig(d_model=48, n_layer=3, d_intermediate=64, vocab_size=99, attn_layer_idx=[2],
                    attn_cfg={"num_heads": 4, "causal": True, "rotary_emb_dim": 8},
                    ssm_cfg={"layer": "Mamba2", "d_state": 16, "dt_limit": (0.0, math.inf)},
                    tie_embeddings=False, pad_vocab_size_multiple=16)
    path = tmp_path / "config.json"
    c.to_json_file(path)
    raw = json.loads(path.read_text())
    assert raw["ssm_cfg"]["dt_limit"] == [0.0, {"__float__": "Infinity"}]  # standard JSON, as transformers 5 writes it
    back = MambaConfig.from_json_file(path)
    assert back.to_dict() == c.to_dict()
    assert MambaConfig.from_dict(c.to_dict()) == MambaConfig.from_dict(back.to_dict())


def test_from_dict_copies_its_input():
    d = MambaConfig(d_model=8, n_layer=1, ssm_cfg={"d_state": 4}).to_dict()
    c = MambaConfig.from_dict(d)
    d["ssm_cfg"]["d_state"] = 99
    assert c.ssm_cfg == {"d_state": 4}


@pytest.mark.parametrize("fields, message", [
    ({"n_layer": 0}, "n_layer"),
    ({"d_model": -4}, "d_model"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"d_intermediate": -1}, "d_intermediate"),
    ({"pad_vocab_size_multiple": 0}, "pad_vocab_size_multiple"),
    ({"d_model": 32.0}, "d_model"),
    ({"rms_norm": "yes"}, "rms_norm"),
    ({"n_layer": 2, "attn_layer_idx": [2], "attn_cfg": {"num_heads": 2}}, "attn_layer_idx"),
    ({"n_layer": 2, "attn_layer_idx": [-1], "attn_cfg": {"num_heads": 2}}, "attn_layer_idx"),
    ({"n_layer": 3, "attn_layer_idx": [1, 1], "attn_cfg": {"num_heads": 2}}, "unique"),
    ({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
    ({"ssm_cfg": {"d_sate": 16}}, "d_sate"),
    ({"ssm_cfg": {"layer": "Mamba2", "dt_rank": 4}}, "dt_rank"),  # a Mamba-1 argument
    ({"ssm_cfg": {"layer_idx": 3}}, "layer_idx"),  # supplied by the model, never by the config
    ({"n_layer": 2, "attn_layer_idx": [0], "attn_cfg": {"num_heads": 2, "rotary_dim": 8}}, "rotary_dim"),
    ({"n_layer": 2, "attn_layer_idx": [0], "attn_cfg": {}}, "num_heads"),
    ({"ssm_cfg": [("d_state", 4)]}, "ssm_cfg"),
])
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MambaConfig(**fields)


def test_unknown_field_in_dict_is_named():
    with pytest.raises(ValueError, match="hidden_size"):
        MambaConfig.from_dict({"d_model": 8, "hidden_size": 8})

