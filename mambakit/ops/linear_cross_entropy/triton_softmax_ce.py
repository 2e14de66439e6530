"""Softmax cross-entropy of one chunk of logits as one Triton kernel: loss and gradient in two reads of the
logits, the gradient written over them in their own dtype. As torch ops (`chunked.softmax_cross_entropy`,
the reference) the same work is some ten passes over an fp32 copy of the chunk: at 4096 tokens x 50K vocab
each pass moves about 1.6 GB."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambakit.ops._triton import program_index

BLOCK_V = 2048  # vocabulary entries per iteration of a row's loops


@triton.jit
def _softmax_ce_kernel(logits_ptr, s_row, V, targets_ptr, weights_ptr, loss_ptr,
                       GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row: loss_row = w (logsumexp(x) - x[target]); with GRAD, x becomes
    w (softmax(x) - onehot(target)). Max and sum are kept per lane over the row, merged once at the end."""
    row = program_index(0)
    ptr = logits_ptr + row * s_row
    lanes = tl.arange(0, BLOCK_V)
    lane_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(ptr + v0 + lanes, mask=v0 + lanes < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        # A lane that has seen only -inf keeps sum 0 (exp of -inf - -inf would be NaN).
        rescale = tl.where(new_max == float("-inf"), 0.0, tl.exp(lane_max - new_max))
        lane_sum = lane_sum * rescale + tl.where(new_max == float("-inf"), 0.0, tl.exp(x - new_max))
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    target = tl.load(targets_ptr + row)
    weight = tl.load(weights_ptr + row)
    target_logit = tl.load(ptr + target).to(tl.float32)
    tl.store(loss_ptr + row, (lse - target_logit) * weight)
    if GRAD:
        for v0 in range(0, V, BLOCK_V):
            v = v0 + lanes
            x = tl.load(ptr + v, mask=v < V, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - (v == target).to(tl.float32)) * weight
            tl.store(ptr + v, grad.to(logits_ptr.dtype.element_ty), mask=v < V)


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, with_grad: bool):
    """`chunked.softmax_cross_entropy` on the GPU. logits (rows, vocab), unit stride along vocab, any float
    dtype; targets (rows,) int64 in [0, vocab); weights (rows,) fp32. Returns (the weighted loss sum, fp32
    scalar; the gradient of it with respect to logits, written over logits, or None)."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    _softmax_ce_kernel[(rows,)](logits, logits.stride(0), vocab, targets, weights, losses, GRAD=with_grad,
                                BLOCK_V=BLOCK_V, num_warps=8)
    return losses.sum(), logits if with_grad else None
