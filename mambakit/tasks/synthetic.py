"""Synthetic sequence tasks from the Mamba and Mamba-2 papers, generated on the fly from a seed.

Every task returns (inputs, targets), both (batch, seq_len) int64: `targets` holds the answer at the
positions the model is scored on and IGNORE elsewhere. The answers are determined by the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


def _random_positions(batch: int, span: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, count) distinct sorted positions in [0, span), uniformly at random per row."""
    return torch.rand(batch, span, generator=generator).argsort(dim=1)[:, :count].sort(dim=1).values


def _check_sizes(task, **minimums: int) -> None:
    """Refuse a task field below its minimum (None, where allowed, is the default), naming it."""
    for name, low in minimums.items():
        value = getattr(task, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{task.name}: {name} expected an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class SelectiveCopying:
    """Mamba Table 1. A context of noise tokens (0) with `num_copy` data tokens (1 .. vocab-2) at random
    positions, then `num_copy` copy markers (vocab-1); at the k-th marker the answer is the k-th data token.
    seq_len counts the markers. Solving it needs content-aware (selective) memory, not a fixed lag."""

    vocab_size: int = 16
    num_copy: int = 16
    name = "selective-copying"

    def __post_init__(self):
        _check_sizes(self, vocab_size=4, num_copy=1)  # noise, a marker and two data tokens at least

    def sample(self, batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        context = seq_len - self.num_copy
        if context < self.num_copy or self.vocab_size < 4:
            raise ValueError(f"selective copying: seq_len {seq_len} / vocab {self.vocab_size} too small "
                             f"for {self.num_copy} tokens")
        data = torch.randint(1, self.vocab_size - 1, (batch, self.num_copy), generator=generator)
        inputs = torch.zeros(batch, seq_len, dtype=torch.long)
        inputs.scatter_(1, _random_positions(batch, context, self.num_copy, generator), data)
        inputs[:, context:] = self.vocab_size - 1
        targets = torch.full_like(inputs, IGNORE)
        targets[:, context:] = data
        return inputs, targets


@dataclass(frozen=True)
class InductionHeads:
    """Mamba Table 2. Random tokens (1 .. vocab-1) with the trigger token 0 placed once, followed by the
    answer token; the sequence ends with the trigger again, where the answer must be recalled."""

    vocab_size: int = 16
    name = "induction-heads"

    def __post_init__(self):
        _check_sizes(self, vocab_size=3)  # the trigger and two tokens to tell apart

    def sample(self, batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len < 4:
            raise ValueError(f"induction heads: seq_len expected >= 4, got {seq_len}")
        inputs = torch.randint(1, self.vocab_size, (batch, seq_len), generator=generator)
        trigger_at = torch.randint(0, seq_len - 2, (batch, 1), generator=generator)
        inputs.scatter_(1, trigger_at, 0)
        inputs[:, -1] = 0
        targets = torch.full_like(inputs, IGNORE)
        targets[:, -1] = inputs.gather(1, trigger_at + 1).squeeze(1)
        return inputs, targets


@dataclass(frozen=True)
class AssociativeRecall:
    """Multi-query associative recall (Zoology; Mamba-2 paper). `num_pairs` key-value pairs (keys distinct,
    from 1 .. vocab/2-1; values from vocab/2 .. vocab-1), then every key queried once in random order at
    random places among noise tokens (0), each query followed by its value; at each query key the answer
    is that key's value. num_pairs=None means seq_len // 4."""

    vocab_size: int = 8192
    num_pairs: int | None = None
    name = "mqar"

    def __post_init__(self):
        _check_sizes(self, vocab_size=4, num_pairs=1)  # noise, one key and one value at least

    def sample(self, batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self.num_pairs or seq_len // 4
        slots = (seq_len - 2 * pairs) // 2  # query slots of two tokens after the key-value section
        half = self.vocab_size // 2
        if pairs < 1 or slots < pairs or half - 1 < pairs:
            raise ValueError(f"mqar: {pairs} pairs do not fit seq_len {seq_len} with vocab {self.vocab_size}")
        keys = torch.rand(batch, half - 1, generator=generator).argsort(dim=1)[:, :pairs] + 1
        values = torch.randint(half, self.vocab_size, (batch, pairs), generator=generator)
        inputs = torch.zeros(batch, seq_len, dtype=torch.long)
        inputs[:, 0: 2 * pairs: 2], inputs[:, 1: 2 * pairs: 2] = keys, values
        order = torch.rand(batch, pairs, generator=generator).argsort(dim=1)
        query_at = 2 * pairs + 2 * _random_positions(batch, slots, pairs, generator)
        inputs.scatter_(1, query_at, keys.gather(1, order))
        inputs.scatter_(1, query_at + 1, values.gather(1, order))
        targets = torch.full_like(inputs, IGNORE)
        targets.scatter_(1, query_at, values.gather(1, order))
        return inputs, targets


TASKS = {task.name: task for task in (SelectiveCopying, InductionHeads, AssociativeRecall)}
