"""Fused linear + cross-entropy for the LM head: the loss of `hidden @ weight.T` without its full logits."""
from __future__ import annotations

import torch

from mambakit.ops._common import FLOAT_DTYPES, INDEX_DTYPES, check_dtype, check_same_device, check_shape
from mambakit.ops.linear_cross_entropy import reference
from mambakit.ops.linear_cross_entropy.chunked import LinearCrossEntropy

REDUCTIONS = ("mean", "sum")


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=4096, reduction="mean", backend=None):
    """Cross-entropy of the logits hidden @ weight.T against labels, chunk_size tokens at a time.

    hidden: (tokens, d_model); weight: (vocab, d_model), e.g. lm_head.weight; labels: (tokens,) int,
    ignore_index marks tokens that do not count. Returns the fp32 loss, equal to
    `F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index, reduction=reduction)`
    (NaN for "mean" when every token is ignored, as there), with the matmul in autocast's dtype when
    autocast is on. Peak extra memory is one (chunk_size, vocab) buffer of logits in the matmul dtype (and
    an fp32 copy of it off the GPU) instead of (tokens, vocab) logits and their gradient; the gradients are
    formed during the forward when hidden or weight requires them. backend: None (Triton on CUDA),
    "reference" or "triton", for the loss of each chunk of logits.
    """
    check_shape("hidden", hidden, None, None)
    check_shape("weight", weight, None, hidden.shape[1])
    check_shape("labels", labels, hidden.shape[0])
    check_dtype("hidden", hidden, FLOAT_DTYPES)
    check_dtype("weight", weight, FLOAT_DTYPES)
    check_dtype("labels", labels, INDEX_DTYPES)
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, labels.long(), int(ignore_index), reduction, chunk_size,
                                    with_grad, backend)


__all__ = ["linear_cross_entropy", "reference"]
