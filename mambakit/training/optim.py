"""AdamW with the papers' weight-decay grouping, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; biases, norm weights and parameters flagged `_no_weight_decay`
    (A_log, D, dt_bias) do not. Each group also lists the parameter names, for checks and logs."""
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = getattr(p, "_no_weight_decay", False) or p.ndim < 2
        group = no_decay if exempt else decay
        group[0].append(name)
        group[1].append(p)
    return [
        {"params": decay[1], "param_names": decay[0], "weight_decay": weight_decay},
        {"params": no_decay[1], "param_names": no_decay[0], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`; the fused kernel on CUDA. capturable (CUDA): its step
    counts and learning rate live on the device, so that a CUDA graph can replay the step."""
    fused = all(p.is_cuda for p in model.parameters())
    if capturable:
        device = next(model.parameters()).device
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=torch.tensor(lr, device=device),
                                 betas=tuple(betas), fused=True, capturable=True)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=fused or None)


@dataclass
class CosineSchedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then a cosine down to `peak_lr * min_ratio`
    at `total_steps`, flat after. Stateless: the learning rate is a function of the step alone."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.1

    def __post_init__(self):
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"schedule: expected 0 <= warmup_steps ({self.warmup_steps}) <= total_steps "
                             f"({self.total_steps}) and total_steps >= 1")
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_ratio: expected in [0, 1], got {self.min_ratio}")

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        floor = self.peak_lr * self.min_ratio
        return floor + (self.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's learning rate for `step` (filled in place where it is a tensor: a captured
        optimizer step reads it there); returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr
