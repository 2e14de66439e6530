"""A training step replayed from CUDA graphs (`TrainConfig.cuda_graph`): the eager step launches some 1,500
kernels from Python (H200, 130M Mamba-2, batch 8 x 2048: 86 ms of host work in a 104 ms step), a replay
launches two graphs per micro-batch and step.

Two graphs share one memory pool: a micro-batch's forward and backward (gradients accumulated into buffers
that stay allocated between steps, its loss summed), then the clip, the optimizer step (AdamW with
`capturable` state and a tensor learning rate, which the schedule fills before each step) and the zeroing
of the gradients. Inputs are copied into the graphs' own batch tensors before each replay.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from mambakit.data import Batch

T = TypeVar("T")
WARMUP_STEPS = 2  # eager steps on a side stream before capture: optimizer state and library workspaces exist


def _static_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


class StepGraphs:
    """micro_step(batch) -> the micro-batch's loss (detached, backward done); optimizer_step() -> the grad norm
    (clip, step, gradients zeroed in place). `example`: a micro-batch on the device, for the shapes."""

    def __init__(self, micro_step: Callable[[Batch], torch.Tensor], optimizer_step: Callable[[], torch.Tensor],
                 example: Batch, micro_batches: int):
        self.batch = Batch(*(_static_copy(t) for t in (example.input_ids, example.targets, example.seq_idx)))
        self.loss_sum = torch.zeros((), device=example.input_ids.device)
        self.micro = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.micro):
            self.loss_sum += micro_step(self.batch)
        self.update = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.update, pool=self.micro.pool()):
            self.grad_norm = optimizer_step()
            self.mean_loss = self.loss_sum / micro_batches
            self.loss_sum.zero_()

    def replay(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `batches` (micro-batches shaped like the example). Returns (mean loss, grad
        norm) as fresh device tensors: the graphs' own are overwritten by the next replay."""
        for batch in batches:
            self.batch.input_ids.copy_(batch.input_ids)
            self.batch.targets.copy_(batch.targets)
            if batch.seq_idx is not None:
                self.batch.seq_idx.copy_(batch.seq_idx)
            self.micro.replay()
        self.update.replay()
        return self.mean_loss.clone(), self.grad_norm.clone()


def warm_up(step: Callable[[], T]) -> T:
    """Run one eager step on a side stream, as graph capture wants its warm-up (stream-ordered with the rest)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = step()
    torch.cuda.current_stream().wait_stream(side)
    return result
