"""`MambaConfig`: the official `mamba_ssm` language-model config, validated, with JSON round trips."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from mambakit._io import write_json

SSM_LAYERS = ("Mamba1", "Mamba2")
# Standard JSON has no inf / NaN; transformers (5+) writes them as {"__float__": "Infinity"}, and so do we.
FLOAT_TAG = "__float__"
TAGGED_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
# Constructor arguments the model supplies itself, so they never belong in ssm_cfg / attn_cfg.
_SUPPLIED_BY_MODEL = ("layer_idx", "device", "dtype", "process_group", "sequence_parallel")


def mixer_class(layer: str):
    """The mixer module class for an ssm_cfg "layer" name ("Mamba1", "Mamba2") or "MHA"."""
    from mambakit import layers

    return {"Mamba1": layers.Mamba, "Mamba2": layers.Mamba2, "MHA": layers.MHA}[layer]


def mixer_defaults(layer: str) -> dict[str, Any]:
    """{argument: default} of a mixer's constructor, leaving out the model width and what the model supplies."""
    params = list(inspect.signature(mixer_class(layer)).parameters.values())[1:]  # [0] is d_model / embed_dim
    return {
        p.name: p.default
        for p in params
        if p.name not in _SUPPLIED_BY_MODEL and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def encode_json_floats(obj: Any) -> Any:
    """`obj` (dicts, lists, tuples, scalars) with each non-finite float as {"__float__": "Infinity" | ...}."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {FLOAT_TAG: "NaN" if math.isnan(obj) else "Infinity" if obj > 0 else "-Infinity"}
    if isinstance(obj, dict):
        return {k: encode_json_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_json_floats(v) for v in obj]
    return obj


def decode_json_floats(obj: Any, field: str = "") -> Any:
    """`obj` (parsed JSON) with each {"__float__": "Infinity" | "-Infinity" | "NaN"} as its float; ValueError
    naming the field (e.g. "time_step_limit[1]") of a "__float__" object that is not one of these."""
    if isinstance(obj, dict) and FLOAT_TAG in obj:
        if len(obj) != 1 or not isinstance(obj[FLOAT_TAG], str) or obj[FLOAT_TAG] not in TAGGED_FLOATS:
            raise ValueError(f"{field or 'config'}: expected {{\"{FLOAT_TAG}\": one of {list(TAGGED_FLOATS)}}} "
                             f"(a non-finite float), got {json.dumps(obj)}")
        return TAGGED_FLOATS[obj[FLOAT_TAG]]
    if isinstance(obj, dict):
        return {k: decode_json_floats(v, f"{field}[{k!r}]" if field else k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_json_floats(v, f"{field}[{i}]") for i, v in enumerate(obj)]
    return obj


def _check_mixer_keys(cfg_name: str, cfg: dict, layer: str) -> None:
    accepted = mixer_defaults(layer)
    unknown = sorted(set(cfg) - set(accepted) - {"layer"})
    if unknown:
        raise ValueError(f"{cfg_name}: unknown keys {unknown} for {layer}; accepted: {sorted(accepted)}")
    required = sorted(k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in cfg)
    if required:
        raise ValueError(f"{cfg_name}: {layer} needs {required}, got keys {sorted(cfg)}")


def validate_dt_limit(name: str, value: Any) -> None:
    """Raise ValueError, naming the field `name`, unless value is a [low, high] pair of numbers."""
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    if not pair or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) \
            or not value[0] <= value[1]:
        raise ValueError(f"{name}: expected [low, high] numbers with low <= high, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


@dataclass
class MambaConfig:
    """Shape of a Mamba language model; field names and defaults follow `mamba_ssm.models.config_mamba`.

    ssm_cfg: keyword arguments of the Mamba / Mamba2 mixer, plus "layer": "Mamba1" | "Mamba2".
    attn_layer_idx: indices of the layers that use attention (MHA with attn_cfg) instead of an SSM.
    d_intermediate: hidden size of a gated MLP after each mixer (0: no MLP).
    The embedding has vocab_size rounded up to a multiple of pad_vocab_size_multiple rows.
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot describe a model."""
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            _check_int(name, getattr(self, name), 1)
        _check_int("d_intermediate", self.d_intermediate, 0)
        for name in ("rms_norm", "residual_in_fp32", "fused_add_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("ssm_cfg", "attn_cfg"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}: expected a dict, got {getattr(self, name)!r}")
        if not isinstance(self.attn_layer_idx, (list, tuple)):
            raise ValueError(f"attn_layer_idx: expected a list of layer indices, got {self.attn_layer_idx!r}")
        for i in self.attn_layer_idx:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layer:
                raise ValueError(f"attn_layer_idx: expected indices in [0, n_layer={self.n_layer}), got {i!r}")
        if len(set(self.attn_layer_idx)) != len(self.attn_layer_idx):
            raise ValueError(f"attn_layer_idx: expected unique indices, got {list(self.attn_layer_idx)}")
        if self.ssm_layer not in SSM_LAYERS:
            raise ValueError(f"ssm_cfg['layer']: expected one of {SSM_LAYERS}, got {self.ssm_layer!r}")
        _check_mixer_keys("ssm_cfg", self.ssm_cfg, self.ssm_layer)
        if "dt_limit" in self.ssm_cfg:  # else a bad pair surfaces only at the first forward
            validate_dt_limit("ssm_cfg['dt_limit']", self.ssm_cfg["dt_limit"])
        if self.attn_layer_idx:
            _check_mixer_keys("attn_cfg", self.attn_cfg, "MHA")

    @property
    def ssm_layer(self) -> str:
        """"Mamba1" or "Mamba2": the mixer of the non-attention layers."""
        return self.ssm_cfg.get("layer", "Mamba1")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: vocab_size rounded up to pad_vocab_size_multiple."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the fields as standard JSON values (tuples become lists, inf {"__float__": "Infinity"})."""
        return json.loads(json.dumps(encode_json_floats(dataclasses.asdict(self)), allow_nan=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        """Build from a dict of fields (as `to_dict` writes them); unknown keys are an error (a config from
        another layout)."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a dict of MambaConfig fields, got {type(d).__name__}")
        d = decode_json_floats(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown MambaConfig fields {unknown}; accepted: {sorted(known)}")
        return cls(**d)  # decode_json_floats built new containers: the caller's dict is not shared

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the fields as JSON, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "MambaConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))
