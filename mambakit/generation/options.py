"""The options of one generation call, checked once: `generate`, `iterate_tokens` and `stream` all take them."""
from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Sequence

import torch

from mambakit.generation.cache import CacheDtypes
from mambakit.generation.sampling import SamplingConfig
from mambakit.ops._common import FLOAT_DTYPES, STEP_STATE_DTYPES, check_dtype_choice

# Prompts longer than this are prefilled in pieces: activations stay bounded by the piece.
DEFAULT_PREFILL_CHUNK = 8192


@dataclass
class GenerationOptions:
    """Everything but the prompts. Sampling fields: see `SamplingConfig` (greedy unless top_k != 1).

    max_new_tokens, or max_length (prompt + new tokens, the official spelling): exactly one.
    seed: an int (row b uses seed + b), one per row, or None (random). A row stops at `eos_token_id`
    (default: the tokenizer's), any of `stop_token_ids`, or once its generated text holds one of
    `stop_strings` (needs `tokenizer`); later positions hold `pad_token_id` (default: the first stop id,
    else 0). cache_dtype: of the conv / KV states (default: the model's). state_dtype: of the SSM states,
    float32 (default), bfloat16 or float16: half the bytes a decode step reads and writes (the states are most
    of them at large batch), the step's math still fp32, rounded once per token (as the official package, whose
    states take the model's dtype).
    prefill_chunk: prompts longer than this are prefilled that many tokens at a time (None: whole).
    teacher_outputs: (batch, T) ids; generated position t of row b is forced to
    teacher_outputs[b, len(prompt_b) + t] while that index is < T (the official meaning).
    vocab_size: sample among the first vocab_size logits (default: the model config's vocab_size).
    cg: decode with CUDA graphs (None: on when the model is on a CUDA device; ignored on the CPU).
    compile: where the decode step runs eagerly (the CPU, or cg=False), run it through `torch.compile`
    (fused C++ / Triton kernels: on the CPU about 1.5-1.8x faster per token at the 130M shape; the first
    call compiles, tens of seconds; inductor needs a C++ compiler on the CPU).
    check_every: read the stop condition back to the host every this many tokens (stop strings: every token).
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = 1
    top_p: float = 0.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | Sequence[int] | None = None
    eos_token_id: int | Sequence[int] | None = None
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    tokenizer: object = None
    pad_token_id: int | None = None
    cache_dtype: torch.dtype | None = None
    state_dtype: torch.dtype = torch.float32
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    teacher_outputs: torch.Tensor | None = None
    vocab_size: int | None = None
    cg: bool | None = None
    compile: bool = False
    check_every: int = 1
    sampling: SamplingConfig = field(init=False)

    def __post_init__(self) -> None:
        self.sampling = SamplingConfig(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        if (self.max_length is None) == (self.max_new_tokens is None):
            raise ValueError("give exactly one of max_new_tokens and max_length, got "
                             f"max_new_tokens={self.max_new_tokens!r}, max_length={self.max_length!r}")
        for name in ("max_length", "max_new_tokens"):
            check_int(name, getattr(self, name), 0, allow_none=True)
        check_int("prefill_chunk", self.prefill_chunk, 1, allow_none=True)
        check_int("vocab_size", self.vocab_size, 1, allow_none=True)
        check_int("check_every", self.check_every, 1)
        check_dtype_choice("cache_dtype", self.cache_dtype, (None, *FLOAT_DTYPES))
        check_dtype_choice("state_dtype", self.state_dtype, STEP_STATE_DTYPES)
        if self.cg is not None and not isinstance(self.cg, bool):
            raise ValueError(f"cg: expected True, False or None, got {self.cg!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: expected True or False, got {self.compile!r}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        self.stop_strings = list(self.stop_strings)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings: expected non-empty strings, got {self.stop_strings!r}")
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings: needs a tokenizer to read the generated text, got tokenizer=None")
        if self.teacher_outputs is not None:
            t = self.teacher_outputs
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in (torch.int32, torch.int64):
                raise ValueError("teacher_outputs: expected a (batch, T) int tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")

    @property
    def cache_dtypes(self) -> CacheDtypes:
        return CacheDtypes(self.cache_dtype, self.state_dtype)

    def stop_ids(self, device: torch.device) -> torch.Tensor:
        """All token ids that end a row (1-D int64): eos (the tokenizer's when not given) and `stop_token_ids`."""
        eos = self.eos_token_id
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, Integral) else list(eos)
        ids = eos + list(self.stop_token_ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, Integral) or i < 0]
        if bad:
            raise ValueError(f"eos_token_id / stop_token_ids: expected ints >= 0, got {bad}")
        return torch.tensor(ids, dtype=torch.long, device=device)

    def token_budgets(self, lengths: torch.Tensor) -> torch.Tensor:
        """New tokens allowed per row (batch,) for prompts of `lengths` (batch,)."""
        if self.max_new_tokens is not None:
            return torch.full_like(lengths, self.max_new_tokens)
        longest = int(lengths.max())
        if longest > self.max_length:
            raise ValueError(f"max_length: expected >= the longest prompt ({longest} tokens), got {self.max_length}")
        return self.max_length - lengths


def check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}{' or None' if allow_none else ''}, got {value!r}")
