"""Fixed-length training sequences cut from a token file, a deterministic train/validation split,
and the order in which every rank of a run reads them.

Window i covers tokens [i*seq_len, i*seq_len + seq_len + 1): its first seq_len tokens are the
input, its last seq_len the targets. Every `val_every`-th window is validation, the rest training.
Training windows are read in a fresh seeded permutation each epoch; sample k of the run is a pure
function of (seed, k), so a run resumes at any sample count on any number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mambakit.data.tokens import TokenFile


@dataclass
class Batch:
    """input_ids, targets: (batch, seq_len) int64; seq_idx: (batch, seq_len) int32 document index
    within each row (starting at 0), or None when document boundaries are not asked for."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    seq_idx: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.seq_idx))


class PackedDataset:
    """Training and validation windows of `seq_len + 1` tokens over `token_file`."""

    def __init__(self, token_file: TokenFile, seq_len: int, val_fraction: float = 0.01, seed: int = 0,
                 with_seq_idx: bool = False):
        if seq_len < 1:
            raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected in [0, 1), got {val_fraction}")
        self.token_file, self.seq_len, self.seed, self.with_seq_idx = token_file, seq_len, seed, with_seq_idx
        num_windows = (len(token_file) - 1) // seq_len
        windows = np.arange(num_windows, dtype=np.int64)
        self.val_every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
        is_val = (windows % self.val_every == self.val_every - 1) if self.val_every else np.zeros(num_windows, bool)
        self.train_windows, self.val_windows = windows[~is_val], windows[is_val]
        if len(self.train_windows) == 0:
            raise ValueError(f"data: {len(token_file)} tokens make no training sequence of seq_len {seq_len}")
        self._epoch, self._order = -1, None

    def __repr__(self) -> str:
        return (f"PackedDataset({len(self.token_file):,} tokens, seq_len {self.seq_len}: "
                f"{len(self.train_windows):,} train / {len(self.val_windows):,} validation sequences)")

    def train_window(self, sample: int) -> int:
        """Window index of the run's `sample`-th training sample (epochs of fresh permutations)."""
        epoch, offset = divmod(sample, len(self.train_windows))
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train_windows))
            self._epoch, self._order = epoch, self.train_windows[order]
        return int(self._order[offset])

    def windows_batch(self, windows: list[int] | np.ndarray) -> Batch:
        """The batch made of these window indices, in order."""
        tokens = self.token_file.tokens
        rows = np.stack([tokens[w * self.seq_len: (w + 1) * self.seq_len + 1] for w in windows])
        rows = torch.from_numpy(rows.astype(np.int64))
        seq_idx = None
        if self.with_seq_idx:
            starts = np.asarray(windows, dtype=np.int64)[:, None] * self.seq_len
            positions = starts + np.arange(self.seq_len)
            doc = np.searchsorted(self.token_file.doc_starts, positions, side="right") - 1
            seq_idx = torch.from_numpy((doc - doc[:, :1]).astype(np.int32))
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), seq_idx)

    def train_batch(self, first_sample: int, batch_size: int) -> Batch:
        """Training samples first_sample .. first_sample + batch_size - 1 of the run."""
        return self.windows_batch([self.train_window(first_sample + i) for i in range(batch_size)])

    def val_batches(self, batch_size: int, max_sequences: int | None = None, rank: int = 0, world_size: int = 1):
        """This rank's share (every world_size-th) of the first `max_sequences` validation windows, in batches."""
        windows = self.val_windows[:max_sequences][rank::world_size]
        for i in range(0, len(windows), batch_size):
            yield self.windows_batch(windows[i: i + batch_size])


def rank_sample_offset(step_first_sample: int, micro_step: int, rank: int, world_size: int, micro_batch: int) -> int:
    """First sample of (micro_step, rank)'s micro-batch within a global batch starting at step_first_sample.

    The global batch of one optimizer step is the same set of samples whatever the world size, so a
    run on N ranks computes the same gradient as on one rank with the same global batch.
    """
    return step_first_sample + (micro_step * world_size + rank) * micro_batch
