"""`TrainConfig`: everything that defines a training run, and the model it builds.

Architectures (all one `MambaConfig`, no separate model code):
  mamba        Mamba-1 blocks                     mamba2       Mamba-2 blocks
  hybrid       Mamba-2 blocks, attention at `attn_layer_idx`
  transformer  Transformer++: attention (rotary) in every layer, each followed by a SwiGLU MLP
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mambakit._io import write_json
from mambakit.data.tokenizer_training import MIN_VOCAB

ARCHS = ("mamba", "mamba2", "hybrid", "transformer")
CONFIG_FILE = "train_config.json"
DEVICE_PATTERN = r"cpu|cuda(:\d+)?"  # the devices training runs on
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str | int) -> int:
    """'200M' -> 200_000_000, '1.5k' -> 1500, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmbgtKMBGT]?)\s*", str(text))
    if not match:
        raise ValueError(f"expected a count such as 4096, 50k, 200M or 1.5B, got {text!r}")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2).lower()])


# Lower bounds of the integer fields (a field whose default is None may be None: the default).
_LOWER_BOUNDS = {
    "seq_len": 1, "d_model": 1, "n_layer": 1, "batch_size": 1, "log_interval": 1, "eval_interval": 1,
    "save_interval": 1, "d_state": 1, "headdim": 1, "expand": 1, "attn_heads": 1, "d_intermediate": 0,
    "micro_batch_size": 1, "eval_sequences": 0, "train_tokenizer": 0, "keep_last": 0, "nonfinite_patience": 1,
}
# Closed ranges of the real-valued fields.
_RANGES = {"val_fraction": (0.0, 0.5), "min_lr_ratio": (0.0, 1.0), "warmup_fraction": (0.0, 1.0),
           "weight_decay": (0.0, float("inf")), "grad_clip": (0.0, float("inf"))}


def _check_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


@dataclass
class TrainConfig:
    """A training run. `batch_size` is the global batch (sequences per optimizer step, over all ranks
    and accumulation steps), so a run is the same on any number of processes."""

    # data
    data: list = field(default_factory=lambda: ["default"])
    include: list = field(default_factory=list)  # globs a file in a data folder must match (one of); [] takes all
    exclude: list = field(default_factory=list)  # globs that drop a file of a data folder
    tokenizer: str | None = None  # tokenizer.json (file or folder); None: bytes
    train_tokenizer: int = 0  # > 0: train a BPE of this vocabulary size on the corpus
    seq_len: int = 1024
    val_fraction: float = 0.01
    use_seq_idx: bool = False  # reset the recurrent state at document boundaries (Mamba-2)
    # model
    arch: str = "mamba2"
    d_model: int = 512
    n_layer: int = 8
    d_state: int | None = None  # None: the mixer's default (16 Mamba-1, 128 Mamba-2)
    headdim: int | None = None  # Mamba-2 head size (None: 64)
    expand: int = 2
    ssm_options: dict = field(default_factory=dict)  # further mixer arguments (chunk_size, dt_min, ngroups, ...)
    attn_layer_idx: list = field(default_factory=list)  # hybrid only
    attn_heads: int | None = None  # None: d_model // 64
    d_intermediate: int | None = None  # MLP width; None: 0 for SSMs, SwiGLU 8/3 * d_model for transformer
    # optimisation
    batch_size: int = 16
    micro_batch_size: int | None = None  # per rank and forward; None: batch_size // world_size
    max_tokens: int = 200_000_000
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.02
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0  # max gradient norm; 0: no clipping
    # run
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    bf16: bool = True  # bf16 autocast on CUDA (CPU runs fp32)
    fsdp: bool = False  # shard parameters and optimizer state (FSDP2) instead of replicating (DDP)
    compile: bool = False  # torch.compile the model's backbone for the train step (not with fsdp)
    cuda_graph: bool = False  # replay each train step from CUDA graphs (one process on CUDA; not with compile)
    log_interval: int = 10
    eval_interval: int = 500
    eval_sequences: int = 256
    save_interval: int = 1000
    keep_last: int = 3  # newest checkpoints kept; 0: keep all
    max_time: float | None = None  # seconds of this invocation (not inherited on resume); then stop and save
    nonfinite_patience: int = 1  # consecutive steps of non-finite loss (checked at log lines) before stopping

    def __post_init__(self):
        self.max_tokens = parse_count(self.max_tokens)
        self.betas, self.data, self.attn_layer_idx = tuple(self.betas), list(self.data), list(self.attn_layer_idx)
        self.include, self.exclude = list(self.include), list(self.exclude)
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {self.arch!r}")
        if self.use_seq_idx and self.arch not in ("mamba", "mamba2"):
            raise ValueError(f"use_seq_idx: document boundaries reset SSM states only (arch mamba or mamba2), "
                             f"got arch {self.arch!r}")
        if self.compile and self.fsdp:
            raise ValueError("compile: not supported with fsdp (FSDP2's per-block hooks inside one compiled "
                             "backbone are untested); got compile=True and fsdp=True")
        if self.cuda_graph and (self.compile or self.device == "cpu"):
            raise ValueError(f"cuda_graph: needs a CUDA device and no compile, got device {self.device!r} and "
                             f"compile={self.compile}")
        if self.arch == "hybrid" and not self.attn_layer_idx:
            raise ValueError("attn_layer_idx: the hybrid arch needs attention layer indices, got none")
        for f in dataclasses.fields(self):
            if f.name in _LOWER_BOUNDS and not (f.default is None and getattr(self, f.name) is None):
                _check_at_least(f.name, getattr(self, f.name), _LOWER_BOUNDS[f.name])
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name}: expected a number in [{low}, {high}], got {value}")
        if not self.lr > 0 or self.lr == float("inf"):
            raise ValueError(f"lr: expected a positive finite learning rate, got {self.lr}")
        if 0 < self.train_tokenizer < MIN_VOCAB:
            raise ValueError(f"train_tokenizer: expected 0 (bytes) or a vocabulary >= {MIN_VOCAB} (the 256 bytes, "
                             f"the end-of-document token and a merge), got {self.train_tokenizer}")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"max_time: expected a positive number of seconds, got {self.max_time}")
        if self.max_tokens < self.tokens_per_step():
            raise ValueError(f"max_tokens: expected at least one step's tokens (batch_size x seq_len = "
                             f"{self.tokens_per_step()}), got {self.max_tokens}")
        bad_layers = [i for i in self.attn_layer_idx if not 0 <= i < self.n_layer]
        if bad_layers:
            raise ValueError(f"attn_layer_idx: expected indices in [0, {self.n_layer - 1}] (n_layer {self.n_layer}), "
                             f"got {bad_layers}")
        heads = self.attention_heads()
        if self.arch in ("hybrid", "transformer") and (self.d_model % heads or (self.d_model // heads) % 2):
            raise ValueError(f"attn_heads: d_model {self.d_model} must split into {heads} heads of an even size "
                             f"(rotary embeddings), got a head size of {self.d_model / heads:g}")
        if self.device is not None and not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")

    def attention_heads(self) -> int:
        """Attention heads of the attention layers (attn_heads, else one per 64 channels)."""
        return self.attn_heads or max(1, self.d_model // 64)

    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def total_steps(self) -> int:
        return max(1, self.max_tokens // self.tokens_per_step())

    def model_config(self, vocab_size: int):
        """The `MambaConfig` of this run's model for a `vocab_size` tokenizer."""
        from mambakit import MambaConfig

        heads = self.attention_heads()
        attn_cfg = {"num_heads": heads, "head_dim": self.d_model // heads, "rotary_emb_dim": self.d_model // heads,
                    "causal": True, "qkv_proj_bias": False, "out_proj_bias": False}
        ssm_cfg = {"layer": "Mamba1" if self.arch == "mamba" else "Mamba2", "expand": self.expand, **self.ssm_options}
        if self.d_state is not None:
            ssm_cfg["d_state"] = self.d_state
        if self.headdim is not None and self.arch != "mamba":
            ssm_cfg["headdim"] = self.headdim
        attn_layers = {"transformer": list(range(self.n_layer)), "hybrid": self.attn_layer_idx}.get(self.arch, [])
        d_intermediate = self.d_intermediate
        if d_intermediate is None:  # SwiGLU at 8/3 d_model keeps the MLP at 8 d_model^2 parameters, rounded to 64
            d_intermediate = (8 * self.d_model // 3 + 63) // 64 * 64 if self.arch == "transformer" else 0
        return MambaConfig(
            d_model=self.d_model, d_intermediate=d_intermediate, n_layer=self.n_layer, vocab_size=vocab_size,
            ssm_cfg=ssm_cfg if len(attn_layers) < self.n_layer else {}, attn_layer_idx=attn_layers,
            attn_cfg=attn_cfg if attn_layers else {},
        )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown fields {unknown}")
        return cls(**d)

    def save(self, folder: str | os.PathLike) -> None:
        write_json(Path(folder) / CONFIG_FILE, self.to_dict())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TrainConfig":
        return cls.from_dict(json.loads((Path(folder) / CONFIG_FILE).read_text()))
