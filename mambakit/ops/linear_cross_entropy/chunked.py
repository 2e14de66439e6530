"""Linear + cross-entropy a chunk of tokens at a time: no (tokens, vocab) tensor is ever built.

Each chunk's fp32 logits give its loss and, when gradients are needed, at once its gradients
(softmax - one-hot, formed in place in the logits buffer): grad_hidden rows and a running fp32
grad_weight. The backward only scales them by the incoming gradient (the loss is a scalar), so the
head's matmul runs three times per chunk instead of four with recomputation.
"""
from __future__ import annotations

import torch


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
    are wanted (grad mode on and an input requiring them; inside forward grad mode is always off)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, with_grad):
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
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits = (h[rows] @ w.T).float()  # (chunk, vocab): the only vocabulary-wide buffer
                lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, targets[rows, None]).squeeze(1)
                loss += ((lse - target_logit) * weights[rows]).sum()
                if grad_h is None and grad_w is None:
                    continue
                grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                grad_logits.scatter_add_(1, targets[rows, None], grad_logits.new_full((grad_logits.shape[0], 1), -1.0))
                grad_logits = grad_logits.mul_(weights[rows, None]).to(dtype)
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
        return grad_hidden, grad_weight, None, None, None, None, None
