"""Linear + cross-entropy a chunk of tokens at a time: no (tokens, vocab) tensor is ever built.

Each chunk's logits give its loss and, when gradients are needed, at once its gradients
(softmax - one-hot, formed in place in the logits buffer): grad_hidden rows and a running fp32
grad_weight. The backward only scales them by the incoming gradient (the loss is a scalar), so the
head's matmul runs three times per chunk instead of four with recomputation.
"""
from __future__ import annotations

import torch

from mambakit.ops._common import dispatch


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, with_grad: bool):
    """Loss of one chunk of logits as torch ops, computed in fp32. logits (rows, vocab) in the matmul dtype;
    targets (rows,) int64; weights (rows,) fp32. Returns (the weighted loss sum, fp32 scalar; the gradient of
    it with respect to logits, written over logits, or None)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, targets[:, None]).squeeze(1)) * weights).sum()
    if not with_grad:
        return loss, None
    grad = x.sub_(lse[:, None]).exp_()  # softmax, in place
    grad.scatter_add_(1, targets[:, None], grad.new_full((grad.shape[0], 1), -1.0))
    grad.mul_(weights[:, None])
    return loss, grad if grad is logits else logits.copy_(grad)


def _triton_softmax_cross_entropy():
    from mambakit.ops.linear_cross_entropy import triton_softmax_ce

    return triton_softmax_ce.softmax_cross_entropy


_IMPLS = {"reference": lambda: softmax_cross_entropy, "triton": _triton_softmax_cross_entropy}


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype of `hidden @ weight.T` here: autocast's when it is on, else the (equal) input dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden, weight: expected one dtype outside autocast, got {hidden.dtype} and {weight.dtype}")
    return hidden.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """hidden (tokens, d), weight (vocab, d), labels (tokens,) -> the fp32 loss (scalar). with_grad: gradients
    are wanted (grad mode on and an input requiring them; inside forward grad mode is always off); backend:
    the chunk loss's implementation (`softmax_cross_entropy` or its Triton kernel), chosen as for every op."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, with_grad, backend):
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen here, explicitly
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = labels != ignore_index
            targets = labels.masked_fill(~valid, 0)  # any row index: ignored rows are weighted by zero
            # mean: each valid token weighs 1/count; count stays on the device (no host sync).
            weights = valid.float() / valid.sum() if reduction == "mean" else valid.float()
            grad_h = torch.empty_like(h) if with_grad and ctx.needs_input_grad[0] else None
            grad_w = (torch.zeros(w.shape, device=w.device, dtype=torch.float32)
                      if with_grad and ctx.needs_input_grad[1] else None)
            loss = torch.zeros((), device=h.device, dtype=torch.float32)
            chunk_loss = dispatch(_IMPLS, backend, h)
            chunk_grad = grad_h is not None or grad_w is not None
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits = h[rows] @ w.T  # (chunk, vocab): the only vocabulary-wide buffer
                loss_rows, grad_logits = chunk_loss(logits, targets[rows], weights[rows], chunk_grad)
                loss += loss_rows
                if grad_h is not None:
                    grad_h[rows] = grad_logits @ w
                if grad_w is not None:
                    grad_w += grad_logits.T @ h[rows]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (grad_h * grad_loss).to(hidden_dtype) if grad_h is not None else None
        grad_weight = (grad_w * grad_loss).to(weight_dtype) if grad_w is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None
