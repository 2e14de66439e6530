import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mambakit.models import CheckpointError, MambaConfig, MambaLMHeadModel
from mambakit.models.checkpoint import config_from_hf, config_to_hf, load_state_dict_checked

KINDS = ["hybrid", "mamba1", "mamba2"]


def same_model(a: MambaLMHeadModel, b: MambaLMHeadModel, tiny) -> None:
    """Same weights (bit for bit) and the same logits on fresh ids."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = tiny.random_ids(a)
    with torch.no_grad():
        assert tiny.rel_err(b(ids).logits, a(ids).logits) < 1e-6


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("safe", [True, False])
def test_official_round_trip(kind, tie, safe, tmp_path, tiny):
    model = tiny.build(kind, tie_embeddings=tie)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    assert json.loads((tmp_path / "config.json").read_text()) == model.config.to_dict()
    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tie
    same_model(model, loaded.eval(), tiny)


def test_safetensors_file_has_no_shared_tensors_and_bin_keeps_the_tied_head(tmp_path, tiny):
    model = tiny.build("mamba1")
    model.save_pretrained(tmp_path / "st")
    assert "lm_head.weight" not in load_file(tmp_path / "st" / "model.safetensors")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    # The official loader (load_state_dict, strict) needs lm_head.weight in the .bin.
    state = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(state["lm_head.weight"], state["backbone.embedding.weight"])


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("tie", [True, False])
def test_hf_round_trip(kind, tie, tmp_path, tiny):
    model = tiny.build(kind, tie_embeddings=tie)  # vocab 101 padded to 104
    model.save_pretrained(tmp_path, format="hf")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == {"mamba1": "mamba", "mamba2": "mamba2"}[kind]
    assert raw["vocab_size"] == 104 and raw["tie_word_embeddings"] == tie
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "backbone.embeddings.weight" in keys and "backbone.embedding.weight" not in keys
    loaded = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config.padded_vocab_size == 104 and loaded.config.ssm_cfg == model.config.ssm_cfg
    same_model(model, loaded, tiny)


def test_hf_config_mapping_round_trip():
    config = MambaConfig(d_model=48, n_layer=3, vocab_size=64, tie_embeddings=False, residual_in_fp32=False,
                         ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 12, "ngroups": 4, "chunk_size": 32,
                                  "dt_limit": (0.001, 0.2), "bias": True, "conv_bias": False, "d_conv": 3})
    hf = config_to_hf(config)
    assert hf["num_heads"] * hf["head_dim"] == hf["expand"] * hf["hidden_size"] == 96
    assert hf["n_groups"] == 4 and hf["time_step_limit"] == [0.001, 0.2] and hf["use_bias"] and not hf["use_conv_bias"]
    back = config_from_hf(hf)
    assert back.ssm_cfg == config.ssm_cfg
    assert (back.d_model, back.n_layer, back.padded_vocab_size, back.tie_embeddings, back.residual_in_fp32) == (
        48, 3, 64, False, False)


def test_hf_config_defaults_are_transformers_ones():
    # A Mamba2 config.json leaving fields out gets transformers' defaults (n_groups 8, untied), not ours.
    c = config_from_hf({"model_type": "mamba2", "hidden_size": 64, "num_heads": 2, "num_hidden_layers": 1,
                        "vocab_size": 10})
    assert c.ssm_cfg["ngroups"] == 8 and c.tie_embeddings is False and c.ssm_cfg["layer"] == "Mamba2"
    c = config_from_hf({"architectures": ["MambaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
                        "vocab_size": 10, "time_step_rank": 4})
    assert c.tie_embeddings is True and c.ssm_cfg == {} and c.ssm_layer == "Mamba1"


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "mamba", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mamba", "layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"model_type": "mamba2", "hidden_size": 64, "num_heads": 3, "head_dim": 64}, "num_heads"),
    ({"model_type": "llama"}, "model_type"),
])
def test_unmappable_hf_configs(fields, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(fields)


@pytest.mark.parametrize("overrides, message", [
    ({}, "attn_layer_idx"),  # the hybrid has attention layers...
    ({"attn_layer_idx": [], "attn_cfg": {}}, "d_intermediate"),  # ... and MLPs
    ({"attn_layer_idx": [], "attn_cfg": {}, "d_intermediate": 0, "rms_norm": False}, "LayerNorm"),
    ({"attn_layer_idx": [], "attn_cfg": {}, "d_intermediate": 0,
      "ssm_cfg": {"layer": "Mamba2", "headdim": 16, "norm_before_gate": True}}, "norm_before_gate"),
    ({"attn_layer_idx": [], "attn_cfg": {}, "d_intermediate": 0,
      "ssm_cfg": {"layer": "Mamba2", "headdim": 16, "D_has_hdim": True}}, "D_has_hdim"),
])
def test_save_hf_refuses_configs_transformers_cannot_express(overrides, message, tmp_path, tiny):
    model = tiny.build("hybrid", **overrides)
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path, format="hf")
    assert not any(tmp_path.iterdir())  # checked before writing anything


def test_sharded_safetensors(tmp_path, tiny):
    model = tiny.build("mamba2", tie_embeddings=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model.config.to_json_file(tmp_path / "config.json")
    same_model(model, MambaLMHeadModel.from_pretrained(tmp_path).eval(), tiny)
    # A shard that lacks a tensor its index promises is named.
    save_file({k: state[k] for k in shards["model-00002-of-00002.safetensors"][1:]},
              tmp_path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="index"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_load_with_dtype(tmp_path, tiny):
    model = tiny.build("mamba1")
    model.save_pretrained(tmp_path)
    half = MambaLMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.backbone.embedding.weight.dtype == torch.bfloat16
    assert torch.equal(half.backbone.embedding.weight, model.backbone.embedding.weight.bfloat16())
    assert MambaLMHeadModel.from_pretrained(tmp_path, dtype="auto").backbone.embedding.weight.dtype == torch.float32


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_weights_name_the_file(safe, damage, tmp_path, tiny):
    tiny.build("mamba1").save_pretrained(tmp_path, safe_serialization=safe)
    path = tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(bytes(torch.randint(0, 256, (64,), dtype=torch.uint8).tolist()) + data[64:])
    with pytest.raises(CheckpointError, match=path.name):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_config_problems_name_the_file(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="config.json"):
        MambaLMHeadModel.from_pretrained(tmp_path)  # empty directory
    tiny.build("mamba1").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text('{"d_model": 32, ')
    with pytest.raises(CheckpointError, match="config.json.*JSON"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    path.write_text('{"width": 32}')
    with pytest.raises(CheckpointError, match="width"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    path.write_text('{"d_model": 32, "n_layer": 0}')
    with pytest.raises(CheckpointError, match="n_layer"):
        MambaLMHeadModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    path.write_text(json.dumps(MambaConfig(d_model=8, n_layer=1).to_dict()))
    with pytest.raises(CheckpointError, match="no weights"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_missing_path_is_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        MambaLMHeadModel.from_pretrained(tmp_path / "no-such-dir")


def damaged_states(state):
    """(name, state dict with one problem, text the error must contain)."""
    first = "backbone.layers.0.mixer.in_proj.weight"
    missing = {k: v for k, v in state.items() if k != first}
    extra = {**state, "backbone.layers.0.mixer.extra_gate": torch.randn(3)}
    wrong = {**state, first: torch.randn(state[first].shape[0] + 1, state[first].shape[1])}
    nan = {**state, first: state[first].clone().index_fill_(0, torch.tensor([1]), math.nan)}
    head = {**state, "lm_head.weight": torch.randn_like(state["backbone.embedding.weight"])}
    return [("missing", missing, f"missing keys.*{first}"), ("unexpected", extra, "unexpected keys.*extra_gate"),
            ("shape", wrong, rf"wrong shapes.*{first} \({state[first].shape[0] + 1}, "),
            ("nan", nan, f"NaN.*{first}"), ("tied head", head, "lm_head.weight differs")]


@pytest.mark.parametrize("case", range(5))
def test_bad_state_dict_leaves_the_model_untouched(case, tiny):
    source, target = tiny.build("mamba1"), tiny.build("mamba1")
    name, state, message = damaged_states(source.state_dict())[case]
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict_checked(target, state)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), name


def test_all_problems_are_listed_at_once(tmp_path, tiny):
    model = tiny.build("mamba1", tie_embeddings=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["backbone.norm_f.weight"]
    state["backbone.layers.1.mixer.D"] = torch.randn(7)
    state["backbone.layers.9.norm.weight"] = torch.randn(32)
    save_file(state, tmp_path / "model.safetensors")
    model.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError) as info:
        MambaLMHeadModel.from_pretrained(tmp_path)
    text = str(info.value)
    for piece in (str(tmp_path), "backbone.norm_f.weight", "backbone.layers.1.mixer.D (7,)", "layers.9.norm.weight"):
        assert piece in text


def test_non_strict_load_keeps_missing_and_ignores_unexpected(tmp_path, tiny):
    model = tiny.build("mamba1", tie_embeddings=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["backbone.extra"] = torch.randn(2)
    save_file(state, tmp_path / "model.safetensors")
    model.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError):
        MambaLMHeadModel.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="lm_head.weight"):
        loaded = MambaLMHeadModel.from_pretrained(tmp_path, strict=False)
    assert torch.equal(loaded.backbone.norm_f.weight, model.backbone.norm_f.weight)
    assert not torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_save_refuses_a_directory_holding_other_weights(tmp_path, tiny):
    model = tiny.build("mamba1")
    model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(FileExistsError, match="pytorch_model.bin"):
        model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, safe_serialization=False)  # overwriting the same file is fine
    with pytest.raises(ValueError, match="format"):
        model.save_pretrained(tmp_path, format="gguf")


def test_tied_checkpoint_holding_only_the_head(tiny):
    source, target = tiny.build("mamba1"), tiny.build("mamba1")
    state = {k: v for k, v in source.state_dict().items() if k != "backbone.embedding.weight"}
    load_state_dict_checked(target, state)
    assert torch.equal(target.backbone.embedding.weight, source.backbone.embedding.weight)
    assert target.lm_head.weight is target.backbone.embedding.weight


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strict", [True, False])
def test_loaded_model_keeps_flags_ties_and_every_weight(kind, strict, tmp_path, tiny):
    model = tiny.build(kind)
    model.save_pretrained(tmp_path)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path, strict=strict)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert q.device.type == "cpu" and q.dtype == p.dtype and torch.equal(q, p), name
        # the trainer's weight-decay grouping and the init read these flags
        assert vars(q) == vars(p), name
    assert any(getattr(p, "_no_weight_decay", False) for p in loaded.parameters())
