"""Process groups for multi-process training (torchrun): which rank this is, wrapping the model
(DDP, or FSDP2 `fully_shard` for big models), and the few collectives the trainer needs."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mambakit.training.config import DEVICE_PATTERN


def check_device(name: str | None) -> torch.device:
    """The device `name` names (cpu, cuda or cuda:N; None: cuda when available, else cpu), refused with a
    ValueError when it is misspelt or this machine lacks it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(DEVICE_PATTERN, str(name)):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} asked for, but this PyTorch sees no CUDA GPU (CUDA build "
                         f"{torch.version.cuda or 'none'}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {name} asked for, but there are {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    return device


@dataclass
class Dist:
    """This process's place in the run: rank, world_size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when we initialised the process group (and so tear it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str | None = None) -> "Dist":
        """Join the process group torchrun describes in the environment (or one already initialised);
        a plain `python` run is a world of one. NCCL on CUDA, gloo on CPU."""
        want_cuda = check_device(device).type == "cuda"
        owns = False
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if want_cuda else "gloo")
            owns = True
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        local = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
        if want_cuda:
            if device and ":" in device:
                local = int(device.split(":")[1])
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        return cls(rank, world, local, dev, owns)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over ranks (a copy; unchanged in a world of one)."""
        value = value.detach().clone()
        if self.enabled:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        if self.enabled:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (a stop signal reaching one process)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def teardown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """The module the training step calls: `model` itself (one process), DDP, or FSDP2-sharded in place
    (each block a unit, then the root). The unwrapped `model` keeps its parameters either way."""
    if not d.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.backbone.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
