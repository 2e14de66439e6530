"""The inference cache handed to layers during generation (DESIGN.md, "Inference-cache protocol").

Layers read `key_value_memory_dict[layer_idx]` (a tuple of state tensors, batch first), `seqlen_offset`
(0: prefill; > 0: a one-token decode step, or a chunk of prefill continuing from the cached states) and `lengths_per_sample` (tokens cached per row, for attention
layers of hybrids). The field names are the official `InferenceParams`' ones, so either works with
code written for the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class CacheDtypes:
    """The dtypes of an inference cache: `states` of the conv / KV states (None: the model's), `ssm` of the SSM
    states (fp32; bf16 / fp16 halve the bytes a decode step reads and writes, most of them at large batch)."""

    states: torch.dtype | None = None
    ssm: torch.dtype = torch.float32


@dataclass
class InferenceCache:
    """Per-layer recurrent states (conv + SSM, or KV for attention), allocated once for `max_batch_size` rows.

    key_value_memory_dict: {layer_idx: (state, ...)}, each state (max_batch_size, ...) or None (unused).
    lengths_per_sample: (max_batch_size,) int64, tokens already cached per row.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    lengths_per_sample: torch.Tensor | None = None

    @classmethod
    def allocate(cls, model: nn.Module, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                 ssm_dtype: torch.dtype = CacheDtypes.ssm) -> "InferenceCache":
        """A zeroed cache for `model` (anything with `allocate_inference_cache(batch_size, max_seqlen, dtype,
        ssm_dtype)`). dtype: of the conv / KV states (None: the model's); ssm_dtype: of the SSM states."""
        for name, value in (("batch_size", batch_size), ("max_seqlen", max_seqlen)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        states = model.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, ssm_dtype=ssm_dtype)
        device = next(iter(_tensors(states)), torch.empty(0)).device
        return cls(
            max_seqlen=max_seqlen,
            max_batch_size=batch_size,
            key_value_memory_dict=dict(states),
            lengths_per_sample=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (what grows with batch size, never with generated tokens for SSMs)."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.key_value_memory_dict))

    def reset(self, rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Zero the states of `rows` (all rows when None, which also rewinds `seqlen_offset` to prefill)."""
        index = slice(None) if rows is None else self._row_index(rows)
        for t in _tensors(self.key_value_memory_dict):
            t[index] = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample[index] = 0
        if rows is None:
            self.seqlen_offset = 0

    def reorder(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Row i takes the state of row `indices[i]` (beam search), in place. indices: (max_batch_size,)."""
        index = self._row_index(indices)
        if index.numel() != self.max_batch_size:
            raise ValueError(f"indices: expected {self.max_batch_size} rows, got {index.numel()}")
        for t in self._batched_tensors():
            t.copy_(t.index_select(0, index))

    def zeros_like(self, batch_size: int) -> "InferenceCache":
        """A zeroed cache of `batch_size` rows with this one's layers, state shapes and dtypes."""
        states = {i: tuple(None if t is None else t.new_zeros((batch_size, *t.shape[1:])) for t in ts)
                  for i, ts in self.key_value_memory_dict.items()}
        lengths = None if self.lengths_per_sample is None else self.lengths_per_sample.new_zeros(batch_size)
        return InferenceCache(self.max_seqlen, batch_size, 0, 0, states, lengths)

    def select(self, rows: Sequence[int] | torch.Tensor) -> "InferenceCache":
        """A new cache holding copies of `rows` (e.g. one sequence out of a batch)."""
        index = self._row_index(rows)
        states = {i: tuple(None if t is None else t.index_select(0, index) for t in ts)
                  for i, ts in self.key_value_memory_dict.items()}
        lengths = None if self.lengths_per_sample is None else self.lengths_per_sample.index_select(0, index)
        return InferenceCache(self.max_seqlen, index.numel(), self.seqlen_offset, 0, states, lengths)

    def write_rows(self, rows: Sequence[int] | torch.Tensor, source: "InferenceCache") -> None:
        """Copy every state of `source` (batch len(rows)) into `rows` of this cache, in place."""
        index = self._row_index(rows)
        if source.key_value_memory_dict.keys() != self.key_value_memory_dict.keys():
            raise ValueError("source: its layers differ from this cache's")
        pairs = [
            pair
            for i, ours in self.key_value_memory_dict.items()
            for pair in zip(ours, source.key_value_memory_dict[i], strict=True)
            if pair[0] is not None
        ]
        if self.lengths_per_sample is not None and source.lengths_per_sample is not None:
            pairs.append((self.lengths_per_sample, source.lengths_per_sample))
        for dst, src in pairs:
            if src.shape[0] != index.numel() or src.shape[1:] != dst.shape[1:]:
                expected = (index.numel(), *dst.shape[1:])
                raise ValueError(f"source: expected states of shape {expected}, got {tuple(src.shape)}")
            dst.index_copy_(0, index, src.to(dst.dtype))

    def _batched_tensors(self) -> list[torch.Tensor]:
        extra = [] if self.lengths_per_sample is None else [self.lengths_per_sample]
        return list(_tensors(self.key_value_memory_dict)) + extra

    def _row_index(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        device = next(iter(self._batched_tensors()), torch.empty(0)).device
        index = torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)
        if index.numel() and (index.min() < 0 or index.max() >= self.max_batch_size):
            raise IndexError(f"rows: expected indices in [0, {self.max_batch_size}), got {index.tolist()}")
        return index


def _tensors(states: dict[int, tuple[torch.Tensor, ...]]):
    return (t for ts in states.values() for t in ts if t is not None)


# The official package's name for the same object.
InferenceParams = InferenceCache
