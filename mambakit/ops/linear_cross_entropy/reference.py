"""Linear + cross-entropy in plain PyTorch: the full (tokens, vocab) fp32 logits, the definition of truth."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """F.cross_entropy((hidden @ weight.T).float(), labels); arguments as `mambakit.ops.linear_cross_entropy`."""
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index, reduction=reduction)
