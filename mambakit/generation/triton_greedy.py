"""Greedy choice and its bookkeeping in one Triton launch per decode step (CUDA): the argmax over the
vocabulary, the NaN check, the stop test and the writes into the decode buffers, which as separate torch
ops cost some fifteen small launches per token (`DecodeBuffers.choose` is the reference).

Each program takes one slice of one row's vocabulary (one program walking a 50K row alone waited on ~25
dependent loads: 12 us on an H200) and folds its best (value, index) into the row's running key with an
atomic max; the row's last program to arrive reads the key, resets it and does the row's bookkeeping."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048  # vocabulary entries per program
NO_KEY = -(2**63)  # the running key before any slice arrived (below every real key)


@triton.jit
def _slice_key(x, v, V):
    """The slice's best as one int64 that orders like (value, -index): its largest value (float bits made
    monotone, -0 counted as +0), then the first index holding it."""
    top = tl.max(x, axis=0) + 0.0
    first = tl.min(tl.where(x == top, v, V), axis=0)
    bits = top.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
    return (ordered.to(tl.int64) << 32) + (4294967295 - first.to(tl.int64))


@triton.jit
def _greedy_choose_kernel(logits_ptr, s_l, V, slices, key_ptr, tokens_ptr, finished_ptr, step_ptr, sequence_ptr,
                          active_ptr, finished_at_ptr, s_seq, budgets_ptr, stop_ptr, n_stop, pad_ptr, nan_ptr,
                          BLOCK_V: tl.constexpr, STOP_P2: tl.constexpr, NO_KEY: tl.constexpr):
    """Grid (rows, slices). key_ptr (rows, 2) int64: the running key and the programs arrived, per row."""
    b = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(logits_ptr + b * s_l + v, mask=v < V, other=float("-inf")).to(tl.float32)
    if tl.max((x != x).to(tl.int32), axis=0) > 0:
        tl.store(nan_ptr, True)  # only ever set: programs racing on it agree
    key = _slice_key(tl.where(x != x, float("-inf"), x), v, V)  # NaN never wins (its flag stops the caller)
    tl.atomic_max(key_ptr + 2 * b, key)
    # acq_rel: the last to arrive sees every program's key.
    if tl.atomic_add(key_ptr + 2 * b + 1, 1) == slices - 1:
        best = tl.atomic_xchg(key_ptr + 2 * b, NO_KEY)
        tl.atomic_xchg(key_ptr + 2 * b + 1, 0)
        token = 4294967295 - (best & 4294967295)
        t = tl.load(step_ptr)
        was_finished = tl.load(finished_ptr + b) != 0
        token = tl.where(was_finished, tl.load(pad_ptr), token)
        slots = tl.arange(0, STOP_P2)
        stops = tl.load(stop_ptr + slots, mask=slots < n_stop, other=-1)
        stopped = tl.sum((stops == token).to(tl.int32), axis=0) > 0
        finished = was_finished | stopped | (tl.load(budgets_ptr + b) <= t + 1)
        tl.store(sequence_ptr + b * s_seq + t, token)
        tl.store(active_ptr + b * s_seq + t, (~was_finished).to(tl.int1))
        tl.store(finished_at_ptr + b * s_seq + t, finished.to(tl.int1))
        tl.store(tokens_ptr + b, token)
        tl.store(finished_ptr + b, finished.to(tl.int1))


def argmax_keys(batch: int, device: torch.device) -> torch.Tensor:
    """The kernel's per-row scratch (batch, 2) int64, in its resting state (every launch leaves it so)."""
    keys = torch.zeros(batch, 2, dtype=torch.int64, device=device)
    keys[:, 0] = NO_KEY
    return keys


def greedy_choose(logits: torch.Tensor, buffers) -> None:
    """`DecodeBuffers.choose` for greedy decoding without teacher tokens or repetition penalty: logits
    (batch, vocab), any row stride; buffers updated in place (its step not advanced: the caller adds 1)."""
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    slices = triton.cdiv(vocab, BLOCK_V)
    _greedy_choose_kernel[(batch, slices)](
        logits, logits.stride(0), vocab, slices, buffers.argmax_keys, buffers.tokens, buffers.finished, buffers.step,
        buffers.sequence, buffers.active, buffers.finished_at, buffers.sequence.stride(0), buffers.budgets,
        buffers.stop_ids, buffers.stop_ids.numel(), buffers.pad, buffers.nan, BLOCK_V=BLOCK_V,
        STOP_P2=triton.next_power_of_2(max(buffers.stop_ids.numel(), 1)), NO_KEY=NO_KEY, num_warps=4)
