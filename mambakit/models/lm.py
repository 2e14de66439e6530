"""`MambaLMHeadModel`: token embedding, a stack of residual blocks (Mamba / Mamba2 / attention
mixers, optional gated MLPs), a final norm and a (tied) LM head. Module names and state-dict keys
match `mamba_ssm.models.mixer_seq_simple`, so official checkpoints load as they are."""
from __future__ import annotations

import inspect
import math
import os
from collections import namedtuple
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.layers import Block, GatedMLP
from mambakit.models import checkpoint
from mambakit.models.config import MambaConfig, mixer_class
from mambakit.ops import RMSNorm
from mambakit.ops._common import INDEX_DTYPES, check_dtype

# logits first, as in mamba_ssm; loss (transformers' name) only when labels are given.
CausalLMOutput = namedtuple("CausalLMOutput", ["logits", "loss"], defaults=[None])
IGNORE_INDEX = -100  # labels at this value are left out of the loss (transformers' convention)

INITIALIZER_KEYS = ("initializer_range", "rescale_prenorm_residual", "n_residuals_per_layer")


def create_block(d_model, d_intermediate, ssm_cfg=None, attn_layer_idx=None, attn_cfg=None, norm_epsilon=1e-5,
                 rms_norm=False, residual_in_fp32=False, fused_add_norm=False, layer_idx=None, device=None,
                 dtype=None) -> Block:
    """One residual block: an attention mixer if layer_idx is in attn_layer_idx, else the SSM named by
    ssm_cfg["layer"] ("Mamba1" by default); a gated MLP of width d_intermediate when it is > 0."""
    factory = {"device": device, "dtype": dtype}
    if layer_idx in (attn_layer_idx or ()):
        mixer_cls = partial(mixer_class("MHA"), layer_idx=layer_idx, **(attn_cfg or {}), **factory)
    else:
        ssm_cfg = dict(ssm_cfg or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        mixer_cls = partial(mixer_class(layer), layer_idx=layer_idx, **ssm_cfg, **factory)
    norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory)
    if d_intermediate == 0:
        mlp_cls = nn.Identity
    else:
        mlp_cls = partial(GatedMLP, hidden_features=d_intermediate, out_features=d_model, **factory)
    block = Block(d_model, mixer_cls, mlp_cls, norm_cls=norm_cls, fused_add_norm=fused_add_norm,
                  residual_in_fp32=residual_in_fp32)
    block.layer_idx = layer_idx
    return block


def _keyword_parameters(module: nn.Module) -> set[str]:
    params = list(inspect.signature(module.forward).parameters.values())[1:]  # [0] is the input
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"inference_params"}


def _check_labels(labels: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in INDEX_DTYPES or labels.shape != input_ids.shape:
        raise ValueError(f"labels: expected an int tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        return  # values are read back on the CPU only, as check_input_ids does (no host sync per step)
    counted = labels[:, 1:] != IGNORE_INDEX  # the first position is never a target
    lo, hi, n = torch.stack([*torch.aminmax(labels.masked_fill(labels == IGNORE_INDEX, 0)), counted.sum()]).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"labels: expected token ids in [0, {vocab_size}) or {IGNORE_INDEX} (ignored), "
                         f"got {lo if lo < 0 else hi}")
    if n == 0:
        raise ValueError(f"labels: expected at least one target past the first position that is not {IGNORE_INDEX}, "
                         "got none (the loss would be NaN)")


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                  rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    """GPT-2 style init, applied to every submodule: embeddings ~ N(0, initializer_range), linear biases
    zero (unless flagged `_no_reinit`, e.g. Mamba's dt_proj bias), and each residual branch's output
    projection (out_proj, fc2) Kaiming-uniform scaled by 1/sqrt(n_residuals_per_layer * n_layer)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                # Re-initialised rather than scaled in place, so that applying this twice is harmless.
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, check_values: bool = True) -> None:
    """input_ids: (batch, seqlen) int32/int64 with values in [0, vocab_size).

    Shape and dtype are always checked. The values are read back only for CPU tensors in eager mode
    (and only if check_values): on CUDA the read-back would be a host sync every forward, one per
    micro-batch in training, and under torch.compile a graph break; there an out-of-range id is
    reported by the embedding's own bounds check (IndexError on CPU, a device-side assert on CUDA).
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor of token ids, got {type(input_ids).__name__}")
    check_dtype("input_ids", input_ids, INDEX_DTYPES)
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids: expected shape (batch, seqlen) with seqlen >= 1, got {tuple(input_ids.shape)}")
    if not check_values or input_ids.device.type != "cpu" or torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids: expected token ids in [0, {vocab_size}) (the vocabulary), got {bad}")


class MixerModel(nn.Module):
    """Embedding, n_layer residual blocks and the final norm: (batch, seqlen) ids -> (batch, seqlen, d_model)."""

    def __init__(self, d_model: int, n_layer: int, d_intermediate: int, vocab_size: int, ssm_cfg=None,
                 attn_layer_idx=None, attn_cfg=None, norm_epsilon: float = 1e-5, rms_norm: bool = False,
                 initializer_cfg=None, fused_add_norm: bool = False, residual_in_fp32: bool = False,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.residual_in_fp32, self.fused_add_norm = residual_in_fp32, fused_add_norm
        self.embedding = nn.Embedding(vocab_size, d_model, **factory)
        self.layers = nn.ModuleList(
            create_block(d_model, d_intermediate, ssm_cfg=ssm_cfg, attn_layer_idx=attn_layer_idx, attn_cfg=attn_cfg,
                         norm_epsilon=norm_epsilon, rms_norm=rms_norm, residual_in_fp32=residual_in_fp32,
                         fused_add_norm=fused_add_norm, layer_idx=i, **factory)
            for i in range(n_layer)
        )
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(d_model, eps=norm_epsilon, **factory)
        initializer_cfg = dict(initializer_cfg or {})
        unknown = sorted(set(initializer_cfg) - set(INITIALIZER_KEYS))
        if unknown:
            raise ValueError(f"initializer_cfg: unknown keys {unknown}; accepted: {list(INITIALIZER_KEYS)}")
        # Each block adds one residual branch (the mixer), two with an MLP. (The official
        # MambaLMHeadModel re-applies the init with one per layer, dropping the MLP's factor.)
        initializer_cfg.setdefault("n_residuals_per_layer", 1 if d_intermediate == 0 else 2)
        self.apply(partial(_init_weights, n_layer=n_layer, **initializer_cfg))
        # Keywords every layer's mixer takes (seq_idx, cu_seqlens, ...): others are refused here, by name.
        self.mixer_kwargs = frozenset.intersection(*(frozenset(_keyword_parameters(b.mixer)) for b in self.layers))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs) -> dict:
        """{layer_idx: that layer's decoding states} (see the mixers' allocate_inference_cache)."""
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    def forward(self, input_ids: torch.Tensor, inference_params=None, **mixer_kwargs) -> torch.Tensor:
        """input_ids: (batch, seqlen) -> normalized hidden states (batch, seqlen, d_model).

        mixer_kwargs: those every mixer takes (`self.mixer_kwargs`); TypeError naming any other."""
        unknown = sorted(set(mixer_kwargs) - self.mixer_kwargs)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward: unknown keyword arguments {unknown}; the mixers "
                            f"(all of them) take {sorted(self.mixer_kwargs)}")
        # Decode steps feed back sampled ids, in range by construction: skip the read-back.
        decoding = inference_params is not None and inference_params.seqlen_offset > 0
        check_input_ids(input_ids, self.embedding.num_embeddings, check_values=not decoding)
        hidden_states, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params,
                                            **mixer_kwargs)
        if self.fused_add_norm and isinstance(self.norm_f, RMSNorm):  # one launch, the sum in fp32 (as official)
            return self.norm_f(hidden_states, residual=residual)
        residual = hidden_states + residual
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))


class MambaLMHeadModel(nn.Module):
    """A Mamba language model: `MixerModel` backbone and a linear LM head (tied to the embedding
    when config.tie_embeddings). Constructor, forward and state-dict keys follow `mamba_ssm`."""

    def __init__(self, config: MambaConfig, initializer_cfg=None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config: expected a MambaConfig, got {type(config).__name__}")
        config.validate()  # the fields may have been edited since construction
        self.config = config
        vocab_size = config.padded_vocab_size
        self.backbone = MixerModel(
            d_model=config.d_model, n_layer=config.n_layer, d_intermediate=config.d_intermediate,
            vocab_size=vocab_size, ssm_cfg=config.ssm_cfg, attn_layer_idx=config.attn_layer_idx,
            attn_cfg=config.attn_cfg, rms_norm=config.rms_norm, initializer_cfg=initializer_cfg,
            fused_add_norm=config.fused_add_norm, residual_in_fp32=config.residual_in_fp32,
            device=device, dtype=dtype,
        )
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False, device=device, dtype=dtype)
        self.tie_weights()
        self.tokenizer = None  # from_pretrained attaches the one saved beside the weights; save_pretrained writes it

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when config.tie_embeddings."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs) -> dict:
        """{layer_idx: states} for decoding batch_size sequences of up to max_seqlen tokens."""
        return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids: torch.Tensor, position_ids=None, inference_params=None, num_last_tokens: int = 0,
                labels: torch.Tensor | None = None, **mixer_kwargs) -> CausalLMOutput:
        """input_ids: (batch, seqlen) int -> CausalLMOutput(logits=(batch, seqlen or num_last_tokens, padded vocab),
        loss).

        labels: (batch, seqlen) ids, usually input_ids itself: loss is then the mean cross-entropy (fp32) of
        predicting labels[:, t + 1] from position t, labels of -100 left out (transformers' causal-LM loss);
        None without labels. input_ids and labels are range-checked against the vocabulary (padding rows of the
        embedding are refused, as `generate` refuses them), on CPU tensors only: no host sync on the GPU.
        position_ids is accepted for compatibility and unused (the SSM layers are position-free and
        attention layers use their own rotary positions); num_last_tokens > 0 keeps only the last ones.
        Further keywords go to the mixers (seq_idx, cu_seqlens, ...; see MixerModel.forward).
        """
        if isinstance(num_last_tokens, bool) or not isinstance(num_last_tokens, int) or num_last_tokens < 0:
            raise ValueError(f"num_last_tokens: expected an int >= 0, got {num_last_tokens!r}")
        if labels is not None and num_last_tokens:
            raise ValueError(f"labels: the loss needs every position's logits, got num_last_tokens={num_last_tokens}")
        decoding = inference_params is not None and inference_params.seqlen_offset > 0
        check_input_ids(input_ids, self.config.vocab_size, check_values=not decoding)
        hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
        if labels is not None:
            _check_labels(labels, input_ids, self.config.vocab_size)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        logits = self.lm_head(hidden_states)
        if labels is None:
            return CausalLMOutput(logits=logits)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                               ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits=logits, loss=loss)

    def generate(self, input_ids, max_length=None, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
                 return_dict_in_generate=False, output_scores=False, **kwargs):
        """`mambakit.generation.generate(self, input_ids, ...)`, with the official signature and defaults."""
        from mambakit.generation import generate

        return generate(self, input_ids, max_length, top_k, top_p, min_p, temperature, return_dict_in_generate,
                        output_scores, **kwargs)

    def stream(self, prompt, tokenizer=None, **options):
        """`mambakit.generation.stream(self, prompt, tokenizer, **options)`: yields text as it is generated."""
        from mambakit.generation import stream

        return stream(self, prompt, tokenizer, **options)

    def log_likelihood(self, text, tokenizer=None):
        """`mambakit.generation.log_likelihood(self, text, tokenizer)`: teacher-forced per-token scores."""
        from mambakit.generation import log_likelihood

        return log_likelihood(self, text, tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name: str | os.PathLike, device=None, dtype=None,
                        strict: bool = True) -> "MambaLMHeadModel":
        """Load a checkpoint directory (or hub id) in the official or the `transformers` layout.

        See `mambakit.models.checkpoint.load_pretrained`."""
        return checkpoint.load_pretrained(cls, pretrained_model_name, device=device, dtype=dtype, strict=strict)

    def save_pretrained(self, save_directory: str | os.PathLike, format: str = "official",
                        safe_serialization: bool = True) -> None:
        """Write config.json and the weights (model.safetensors, or pytorch_model.bin when not
        safe_serialization) in the official layout or, with format="hf", the `transformers` one."""
        checkpoint.save_pretrained(self, save_directory, format=format, safe_serialization=safe_serialization)
