"""Greedy choice and its bookkeeping in one Triton launch per decode step (CUDA): the argmax over the
vocabulary, the NaN check, the stop test and the writes into the decode buffers, which as separate torch
ops cost some fifteen small launches per token (`DecodeBuffers.choose` is the reference)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048  # vocabulary entries per iteration of a row's loop


@triton.jit
def _greedy_choose_kernel(logits_ptr, s_l, V, tokens_ptr, finished_ptr, step_ptr, sequence_ptr, active_ptr,
                          finished_at_ptr, s_seq, budgets_ptr, stop_ptr, n_stop, pad_ptr, nan_ptr,
                          BLOCK_V: tl.constexpr, STOP_P2: tl.constexpr):
    """One program per row: the first index of the row's largest logit, then the row's buffers at step t."""
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    best_at = tl.zeros((BLOCK_V,), tl.int32)
    nan = tl.zeros((BLOCK_V,), tl.int32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + lanes
        x = tl.load(logits_ptr + b * s_l + v, mask=v < V, other=float("-inf")).to(tl.float32)
        nan |= (x != x).to(tl.int32)
        better = x > best  # strict: each lane keeps its first maximum
        best = tl.where(better, x, best)
        best_at = tl.where(better, v, best_at)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_at, V), axis=0).to(tl.int64)
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
    if tl.max(nan, axis=0) > 0:
        tl.store(nan_ptr, True)  # only ever set: rows racing on it agree


def greedy_choose(logits: torch.Tensor, buffers) -> None:
    """`DecodeBuffers.choose` for greedy decoding without teacher tokens or repetition penalty: logits
    (batch, vocab), any row stride; buffers updated in place (its step not advanced: the caller adds 1)."""
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    _greedy_choose_kernel[(batch,)](
        logits, logits.stride(0), vocab, buffers.tokens, buffers.finished, buffers.step, buffers.sequence,
        buffers.active, buffers.finished_at, buffers.sequence.stride(0), buffers.budgets, buffers.stop_ids,
        buffers.stop_ids.numel(), buffers.pad, buffers.nan, BLOCK_V=BLOCK_V,
        STOP_P2=triton.next_power_of_2(max(buffers.stop_ids.numel(), 1)), num_warps=8)
