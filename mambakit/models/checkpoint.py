"""Checkpoint directories in the official `state-spaces` layout and the Hugging Face `transformers` one.

A directory holds config.json and the weights: model.safetensors, a sharded set indexed by
model.safetensors.index.json, or pytorch_model.bin (read with weights_only=True, never executing code).

- official: config.json holds `MambaConfig` fields; keys are those of `MambaLMHeadModel.state_dict()`.
- hf: config.json of `MambaForCausalLM` (model_type "mamba") or `Mamba2ForCausalLM` ("mamba2");
  keys differ only by `backbone.embeddings.weight` (official: `backbone.embedding.weight`).
  transformers' vocab_size is the padded embedding size; its Mamba2 gated norm is the official
  one with norm_before_gate=False and group_size = d_inner / n_groups; D is per head; time_step_limit
  is dt_limit (non-finite floats spelled {"__float__": "Infinity"} as transformers 5 writes them, or
  left out when they are its default); layer_norm_epsilon must be 1e-5 (fixed in the official model).
  Hybrids (attention, MLPs), LayerNorm and other Mamba2 norms have no transformers equivalent and are
  refused by name. Init-only arguments without a transformers field (A_init_range, conv_init) are not
  carried over. An export also writes generation_config.json: the tokenizer's special token ids and the
  padding rows as suppress_tokens, from which the loader takes the real vocab_size back.

A tokenizer saved beside the weights (mambakit.tokenizer) is attached to the loaded model and saved with it.

Loading checks the whole state dict against the model (missing, unexpected, wrongly shaped and
non-finite tensors, all listed in one error) before copying anything, so a failed load leaves the
model as it was.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from mambakit._io import atomic_path, read_json_object, write_json
from mambakit.models.config import (MambaConfig, decode_json_floats, encode_json_floats, mixer_defaults,
                                    validate_dt_limit)
from mambakit.tokenizer import has_tokenizer, load_tokenizer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
# Looked for in this order; an index names the shard files holding each tensor.
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_NAME + ".index.json", BIN_NAME, BIN_NAME + ".index.json")
FORMATS = ("official", "hf")

OFFICIAL_EMBEDDING, HF_EMBEDDING = "backbone.embedding.weight", "backbone.embeddings.weight"
HEAD = "lm_head.weight"

# Both the official blocks' RMSNorm and its Mamba2 gated norm use this epsilon; it is not a config field.
NORM_EPS = 1e-5

# Defaults of the `transformers` config classes, for fields a config.json may leave out.
HF_DEFAULTS = {
    "mamba": dict(
        vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32, layer_norm_epsilon=1e-5, expand=2,
        conv_kernel=4, use_bias=False, use_conv_bias=True, hidden_act="silu", residual_in_fp32=True,
        time_step_rank="auto", time_step_scale=1.0, time_step_min=0.001, time_step_max=0.1,
        time_step_init_scheme="random", time_step_floor=1e-4, tie_word_embeddings=True,
    ),
    "mamba2": dict(
        num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128, num_hidden_layers=64,
        layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8, use_bias=False, use_conv_bias=True,
        hidden_act="silu", residual_in_fp32=True, time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4,
        time_step_limit=(0.0, math.inf), chunk_size=256, tie_word_embeddings=False,
    ),
}
HF_ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}
# (official mixer argument, transformers config field)
HF_MIXER_FIELDS = {
    "mamba": (
        ("d_state", "state_size"), ("d_conv", "conv_kernel"), ("expand", "expand"), ("dt_rank", "time_step_rank"),
        ("dt_min", "time_step_min"), ("dt_max", "time_step_max"), ("dt_init", "time_step_init_scheme"),
        ("dt_scale", "time_step_scale"), ("dt_init_floor", "time_step_floor"), ("conv_bias", "use_conv_bias"),
        ("bias", "use_bias"),
    ),
    "mamba2": (
        ("d_state", "state_size"), ("d_conv", "conv_kernel"), ("expand", "expand"), ("headdim", "head_dim"),
        ("ngroups", "n_groups"), ("chunk_size", "chunk_size"), ("dt_min", "time_step_min"),
        ("dt_max", "time_step_max"), ("dt_init_floor", "time_step_floor"), ("dt_limit", "time_step_limit"),
        ("conv_bias", "use_conv_bias"), ("bias", "use_bias"),
    ),
}
SSM_LAYER_OF_HF = {"mamba": "Mamba1", "mamba2": "Mamba2"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------------
# config.json in the two layouts


def _auto_dt_rank(d_model: int) -> int:
    return math.ceil(d_model / 16)


def config_from_hf(hf: dict[str, Any]) -> MambaConfig:
    """The MambaConfig of a `transformers` MambaConfig / Mamba2Config dict (config.json contents).

    The embedding size is taken as given (pad_vocab_size_multiple=1): transformers' vocab_size is
    already the padded one. Raises ValueError for configs the official model cannot express."""
    model_type = hf.get("model_type") or {v: k for k, v in HF_ARCHITECTURES.items()}.get(
        (hf.get("architectures") or [None])[0])
    if model_type not in HF_DEFAULTS:
        raise ValueError(f"model_type: expected one of {sorted(HF_DEFAULTS)}, got {model_type!r}")
    hf = {**HF_DEFAULTS[model_type], **hf}
    if hf["hidden_act"] != "silu":
        raise ValueError(f"hidden_act: only 'silu' maps to the official Mamba, got {hf['hidden_act']!r}")
    if hf["layer_norm_epsilon"] != NORM_EPS:
        raise ValueError(f"layer_norm_epsilon: the official model's norms use {NORM_EPS}, got {hf['layer_norm_epsilon']}")
    if model_type == "mamba2" and hf["num_heads"] * hf["head_dim"] != int(hf["expand"] * hf["hidden_size"]):
        raise ValueError(f"num_heads * head_dim ({hf['num_heads']} * {hf['head_dim']}) must equal expand * "
                         f"hidden_size ({hf['expand']} * {hf['hidden_size']})")
    if model_type == "mamba2":
        validate_dt_limit("time_step_limit", hf["time_step_limit"])
    if model_type == "mamba" and hf["time_step_rank"] == _auto_dt_rank(hf["hidden_size"]):
        hf["time_step_rank"] = "auto"
    layer = SSM_LAYER_OF_HF[model_type]
    defaults = mixer_defaults(layer)
    ssm_cfg = {} if layer == "Mamba1" else {"layer": layer}
    for ours, theirs in HF_MIXER_FIELDS[model_type]:
        value = tuple(hf[theirs]) if isinstance(hf[theirs], list) else hf[theirs]
        if value != defaults[ours]:
            ssm_cfg[ours] = value
    return MambaConfig(
        d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], ssm_cfg=ssm_cfg,
        rms_norm=True, residual_in_fp32=hf["residual_in_fp32"], fused_add_norm=True, pad_vocab_size_multiple=1,
        tie_embeddings=hf["tie_word_embeddings"],
    )


def config_to_hf(config: MambaConfig) -> dict[str, Any]:
    """The `transformers` config.json dict for `config`; ValueError listing what it cannot express."""
    model_type = "mamba2" if config.ssm_layer == "Mamba2" else "mamba"
    mixer = {**mixer_defaults(config.ssm_layer), **config.ssm_cfg}
    d_inner = int(mixer["expand"] * config.d_model)
    problems = []
    if config.attn_layer_idx:
        problems.append(f"attention layers (attn_layer_idx={list(config.attn_layer_idx)})")
    if config.d_intermediate:
        problems.append(f"MLP blocks (d_intermediate={config.d_intermediate})")
    if not config.rms_norm:
        problems.append("LayerNorm (rms_norm=False; transformers uses RMSNorm)")
    if mixer["expand"] != int(mixer["expand"]):
        problems.append(f"a fractional expand ({mixer['expand']})")
    if model_type == "mamba2":
        if mixer["d_ssm"] not in (None, d_inner):
            problems.append(f"d_ssm={mixer['d_ssm']} != expand * d_model = {d_inner}")
        if mixer["D_has_hdim"]:
            problems.append("D_has_hdim=True (transformers' D has one value per head)")
        if not mixer["rmsnorm"] or mixer["norm_before_gate"]:
            problems.append("a Mamba2 norm other than rmsnorm=True, norm_before_gate=False")
    if problems:
        raise ValueError(f"config: the transformers {HF_ARCHITECTURES[model_type]} cannot express " + "; ".join(problems))
    hf = {
        "architectures": [HF_ARCHITECTURES[model_type]], "model_type": model_type,
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
        "layer_norm_epsilon": NORM_EPS, "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
    }
    for ours, theirs in HF_MIXER_FIELDS[model_type]:
        hf[theirs] = mixer[ours]
    hf["expand"] = int(mixer["expand"])
    if model_type == "mamba":
        hf["time_step_rank"] = _auto_dt_rank(config.d_model) if mixer["dt_rank"] == "auto" else mixer["dt_rank"]
    else:
        hf["num_heads"] = d_inner // mixer["headdim"]
        if tuple(mixer["dt_limit"]) == HF_DEFAULTS["mamba2"]["time_step_limit"]:
            del hf["time_step_limit"]  # (0, inf) has no JSON spelling that every transformers version reads
    return encode_json_floats(hf)


def padding_rows(config: MambaConfig) -> list[int]:
    """Ids of the embedding rows past vocab_size (padding, never a token)."""
    return list(range(config.vocab_size, config.padded_vocab_size))


def _unpadded(config: MambaConfig, generation_config: dict[str, Any]) -> MambaConfig:
    """`config` (read from transformers' layout, whose vocab_size is the padded one) with the real vocab_size
    when generation_config suppresses exactly the padding rows at the end, as mambakit's export writes."""
    suppressed = generation_config.get("suppress_tokens")
    rows = config.padded_vocab_size
    if not suppressed or suppressed != list(range(rows - len(suppressed), rows)) or len(suppressed) >= rows:
        return config
    vocab_size = rows - len(suppressed)
    multiple = next(m for m in (8, rows) if -(-vocab_size // m) * m == rows)  # the official multiple when it fits
    return dataclasses.replace(config, vocab_size=vocab_size, pad_vocab_size_multiple=multiple)


def read_config(directory: Path) -> tuple[MambaConfig, str]:
    """(MambaConfig, layout) from directory/config.json; layout is "official" or "hf"."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a checkpoint directory needs {CONFIG_NAME}")
    raw = read_json_object(path, CheckpointError)
    if "d_model" in raw:
        layout, build = "official", MambaConfig.from_dict
    elif "model_type" in raw or "architectures" in raw:
        layout, build = "hf", config_from_hf
    else:
        raise CheckpointError(f"{path}: neither an official config (d_model, n_layer, ...) nor a transformers one "
                              f"(model_type 'mamba' or 'mamba2'); got keys {sorted(raw)}")
    try:
        config = build(decode_json_floats(raw))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    generation_path = directory / GENERATION_CONFIG_NAME
    if layout == "hf" and generation_path.is_file():
        config = _unpadded(config, read_json_object(generation_path, CheckpointError))
    return config, layout


# ---------------------------------------------------------------------------------------------
# weight files


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # each reader has its own error types; all mean the file is unusable
        raise CheckpointError(f"{path}: cannot read the weights, the file is corrupted or truncated "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, got {type(state).__name__}")
    return state


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a shard index with a 'weight_map' ({e})") from e
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_weights_file(index_path.parent / shard))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"{index_path}: tensors listed in the index are in no shard: {_listing(absent)}")
    return state


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `directory`, on the CPU, keys as stored."""
    for name in WEIGHT_NAMES:
        path = directory / name
        if path.is_file():
            return _read_sharded(path) if name.endswith(".index.json") else _read_weights_file(path)
    raise CheckpointError(f"{directory}: no weights found; expected one of {WEIGHT_NAMES}")


def _rename(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {new if k == old else k: v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# loading into a model


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _merge_tied_head(state: dict[str, torch.Tensor]) -> list[str]:
    """Drop lm_head.weight from `state` for a model whose head shares the embedding; a pair stored under
    the head's name only becomes the embedding. Returns the problems found (a head unequal to the embedding)."""
    head = state.pop(HEAD, None)
    if head is None:
        return []
    embedding = state.setdefault(OFFICIAL_EMBEDDING, head)
    if embedding.shape != head.shape or not torch.equal(embedding, head):
        return [f"{HEAD} differs from {OFFICIAL_EMBEDDING} but config.tie_embeddings is True"]
    return []


def load_state_dict_checked(model, state_dict: dict[str, torch.Tensor], strict: bool = True,
                            source: str = "state_dict") -> tuple[list[str], list[str]]:
    """Copy official-layout `state_dict` into `model` (a MambaLMHeadModel), after checking all of it.

    Raises CheckpointError, with the model untouched, listing wrongly shaped or non-finite tensors
    and (when strict) missing and unexpected keys. With tied embeddings either lm_head.weight or the
    embedding may be absent; when both are present they must be equal. Tensors are cast to each
    parameter's dtype and device. Returns (missing_keys, unexpected_keys), empty when strict.
    """
    expected = model.state_dict()
    state = dict(state_dict)
    problems = []
    expected_keys = set(expected)
    if model.config.tie_embeddings:
        problems += _merge_tied_head(state)
        expected_keys.discard(HEAD)
    missing = sorted(expected_keys - set(state))
    unexpected = sorted(set(state) - expected_keys)
    wrong_shape = [f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})" for k, v in sorted(state.items())
                   if k in expected_keys and v.shape != expected[k].shape]
    wrong_kind = [k for k, v in sorted(state.items())
                  if k in expected_keys and v.is_floating_point() != expected[k].is_floating_point()]
    non_finite = [k for k, v in sorted(state.items()) if v.is_floating_point() and not torch.isfinite(v).all()]
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): {_listing(wrong_shape)}")
    if wrong_kind:
        problems.append(f"integer tensors for float parameters or the reverse: {_listing(wrong_kind)}")
    if non_finite:
        problems.append(f"tensors holding NaN or inf: {_listing(non_finite)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in expected_keys}, strict=False)
    return ([], []) if strict else (missing, unexpected)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_directory(name: str | os.PathLike) -> Path:
    """A local checkpoint directory; a name that is no local path but looks like a hub id ("owner/name")
    is downloaded with huggingface_hub when that is installed."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    if not _HUB_ID.fullmatch(str(name)):
        raise FileNotFoundError(f"{name}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(f"{name}: no such directory (install huggingface_hub to download hub ids)") from e
    try:
        local = Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors"]))
        if not any((local / w).is_file() for w in WEIGHT_NAMES):
            local = Path(snapshot_download(str(name), allow_patterns=["*.json", "pytorch_model*.bin"]))
    except Exception as e:  # hub errors (network, unknown repo, auth) all mean: nothing to load
        raise FileNotFoundError(f"{name}: not a local directory, and downloading it from the hub failed ({e})") from e
    return local


def materialize(model, device=None) -> None:
    """Give a model built on the meta device real, uninitialised storage on `device` (default CPU),
    keeping what `to_empty` drops: the parameters' flags (`_no_weight_decay`, ...) and the tied head."""
    flags = {name: dict(vars(p)) for name, p in model.named_parameters(remove_duplicate=False)}
    model.to_empty(device=device or "cpu")
    for name, p in model.named_parameters(remove_duplicate=False):
        vars(p).update(flags[name])
    model.tie_weights()


def load_pretrained(cls, name: str | os.PathLike, device=None, dtype=None, strict: bool = True):
    """Build `cls` (MambaLMHeadModel) from a checkpoint directory or hub id, in either layout.

    dtype / device: those of the built model (parameters the layers keep in fp32 stay fp32);
    the stored tensors are cast to them. dtype="auto" takes the stored embedding's dtype. strict=False
    tolerates missing keys (left as initialized) and unexpected ones (ignored), with a warning; shapes
    must match either way. A tokenizer saved beside the weights becomes `model.tokenizer` (else None).
    """
    directory = resolve_directory(name)
    config, layout = read_config(directory)
    state = read_state_dict(directory)
    if layout == "hf":
        state = _rename(state, HF_EMBEDDING, OFFICIAL_EMBEDDING)
    if dtype == "auto":
        dtype = state[OFFICIAL_EMBEDDING].dtype if OFFICIAL_EMBEDDING in state else None
    if strict:  # every tensor comes from the file: skip the random init (22 s of a 1.4B model's load on CPU)
        with torch.device("meta"):
            model = cls(config, dtype=dtype)
        materialize(model, device)
    else:
        model = cls(config, device=device, dtype=dtype)
    missing, unexpected = load_state_dict_checked(model, state, strict=strict, source=str(directory))
    if missing or unexpected:
        warnings.warn(f"{directory}: loaded with missing keys {_listing(missing)} and unexpected keys "
                      f"{_listing(unexpected)}", stacklevel=2)
    model.tokenizer = load_tokenizer(directory) if has_tokenizer(directory) else None
    return model


# ---------------------------------------------------------------------------------------------
# saving


def special_token_fields(tokenizer) -> dict[str, int]:
    """The eos / bos / pad ids of `tokenizer` (None: none) as transformers config fields, pad defaulting to eos
    (what both mambakit's and transformers' generate pad finished rows with)."""
    ids = {f"{s}_token_id": getattr(tokenizer, f"{s}_token_id", None) for s in ("eos", "bos", "pad")}
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return {k: v for k, v in ids.items() if v is not None}


def hf_generation_config(model) -> dict[str, Any]:
    """generation_config.json of an HF export: the special token ids, and the padding rows suppressed so
    that transformers' generate, like mambakit's, never emits them."""
    generation = special_token_fields(getattr(model, "tokenizer", None))
    if padding_rows(model.config):
        generation["suppress_tokens"] = padding_rows(model.config)
    return generation


def save_pretrained(model, directory: str | os.PathLike, format: str = "official",
                    safe_serialization: bool = True) -> None:
    """Write config.json and model.safetensors (pytorch_model.bin when not safe_serialization).

    format="official": MambaConfig fields and the model's own keys (loadable by mamba_ssm when
    written as .bin). format="hf": a config.json and keys that transformers' MambaForCausalLM /
    Mamba2ForCausalLM load directly, with the eos / bos / pad ids of `model.tokenizer` in config.json
    and generation_config.json (which also suppresses the padding rows of the vocabulary); ValueError
    if the config has no transformers equivalent. `model.tokenizer`, if any, is saved beside the weights.
    A tied LM head is left out of safetensors files (which refuse shared tensors) and kept in .bin.
    Each file is written atomically.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    directory = Path(directory)
    weights_name = SAFETENSORS_NAME if safe_serialization else BIN_NAME
    shadowing = [w for w in WEIGHT_NAMES if w != weights_name and (directory / w).exists()]
    if shadowing:
        raise FileExistsError(f"{directory}: already holds {shadowing}, which a loader could pick instead of "
                              f"{weights_name}; choose an empty directory or remove them")
    config = model.config.to_dict() if format == "official" else config_to_hf(model.config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if safe_serialization and model.config.tie_embeddings:
        del state[HEAD]
    if format == "hf":
        state = _rename(state, OFFICIAL_EMBEDDING, HF_EMBEDDING)
        config["dtype"] = str(model.backbone.embedding.weight.dtype).removeprefix("torch.")
        config.update(special_token_fields(getattr(model, "tokenizer", None)))
    with atomic_path(directory / weights_name) as tmp:
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
    if format == "hf":
        write_json(directory / GENERATION_CONFIG_NAME, hf_generation_config(model))
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(directory)
    write_json(directory / CONFIG_NAME, config)  # last: a directory with a config.json is complete
