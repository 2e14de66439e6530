"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

Random draws come from a counter-based generator: row b at step t uses hash(seed_b, t). A row's
samples therefore depend only on its own seed and logits, never on which other rows share the
batch (batched == one-by-one), and the draw is pure tensor arithmetic (no host sync, capturable in
a CUDA graph).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens, with the official `mamba_ssm` defaults and meaning: greedy (argmax) when
    top_k == 1 (the default), sampling otherwise; temperature 0 is greedy too.

    temperature: >= 0, divides the logits. top_k: keep the k most likely tokens (0 or None: all).
    top_p: in [0, 1], keep the smallest set of most likely tokens whose probability reaches top_p
    (0 or 1: no filter). min_p: in [0, 1), drop tokens less likely than min_p times the most likely one.
    repetition_penalty: > 0, logits of tokens already in the row (prompt included) are divided by it
    when positive and multiplied when negative (CTRL); 1 leaves them alone.
    """

    temperature: float = 1.0
    top_k: int | None = 1
    top_p: float = 0.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check_real("temperature", self.temperature, lambda v: v >= 0, ">= 0")
        _check_real("top_p", self.top_p, lambda v: 0 <= v <= 1, "in [0, 1] (0 or 1: no filter)")
        _check_real("min_p", self.min_p, lambda v: 0 <= v < 1, "in [0, 1)")
        _check_real("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, Integral) or k < 0):
            raise ValueError(f"top_k: expected an int >= 0 (1: greedy; 0 or None: no limit), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


def _check_real(name: str, value, ok, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}: expected a finite number {expected}, got {value!r}")


def row_seeds(seed: int | Sequence[int] | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """Seeds (batch_size,) int64: `seed + row` for an int, one per row for a sequence, random for None
    (drawn from torch's global generator, so `torch.manual_seed` reproduces it)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, Integral) and not isinstance(seed, bool):
        seeds = [seed + row for row in range(batch_size)]
    elif isinstance(seed, (Sequence, torch.Tensor)):
        seeds = [s.item() if isinstance(s, torch.Tensor) else s for s in seed]
    else:
        raise ValueError(f"seed: expected an int or a list of ints (one per row), got {seed!r}")
    if len(seeds) != batch_size:
        raise ValueError(f"seed: expected an int or {batch_size} ints (one per row), got {len(seeds)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, Integral) or not 0 <= s <= _MAX_SEED:
            raise ValueError(f"seed: expected ints in [0, 2**63), got {s!r}")
    return torch.tensor(seeds, dtype=torch.long, device=device)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 in two halves, so no int64 product can overflow.
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # Wellons' "lowbias32" integer hash on values in [0, 2**32).
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """Deterministic uniform draws in [0, 1): (batch,) float64 from seeds (batch,) int64 and a step counter
    (an int, or a tensor broadcast against seeds: seeds (B, 1) and steps (1, S) give every row's S draws)."""
    h = _hash32(torch.as_tensor(step, dtype=torch.long, device=seeds.device) & _MASK32)
    h = _hash32(h ^ ((seeds >> 32) & _MASK32))
    h = _hash32(h ^ (seeds & _MASK32))
    return h.to(torch.float64) / 2.0**32


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits, seen: (batch, vocab); seen is True for tokens already in the row."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filtered_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Probabilities (batch, vocab) fp32 after temperature, top-k, top-p and min-p, renormalized."""
    logits = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < config.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the more likely ones already reach top_p (the most likely always stays).
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= config.top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if config.min_p:
        probs = probs.masked_fill(probs < config.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(logits: torch.Tensor, config: SamplingConfig, seeds: torch.Tensor, step: torch.Tensor | int,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (batch,) int64 from logits (batch, vocab); `seen` (batch, vocab) bool for the repetition penalty."""
    return sample_with_draws(logits, config, None if config.greedy else uniform(seeds, step), seen)


def sample_with_draws(logits: torch.Tensor, config: SamplingConfig, draws: torch.Tensor | None,
                      seen: torch.Tensor | None = None) -> torch.Tensor:
    """`sample` with its draws given: uniform(seeds, step) (batch,) float64, computed ahead by a caller that
    draws many steps in one call (None when config.greedy: no draw is used)."""
    if config.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("seen: required when repetition_penalty != 1")
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    if draws is None:
        raise ValueError("draws: required unless the sampling is greedy")
    cdf = torch.cumsum(filtered_probs(logits, config).double(), dim=-1)
    target = draws * cdf[:, -1]
    # The first token whose cumulative probability exceeds the target: never a zero-probability one.
    index = torch.searchsorted(cdf, target[:, None], right=True)
    return index.squeeze(-1).clamp_(max=logits.shape[-1] - 1)
