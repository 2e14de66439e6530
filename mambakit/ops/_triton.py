"""Triton helpers shared by the ops' kernels (imported only where Triton is)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INT32_ELEMENTS = 2**31


@triton.jit
def program_index(axis: tl.constexpr, WIDE: tl.constexpr = True):
    """tl.program_id, in int64 when WIDE, so that the offsets built from it (batch x stride, row x stride,
    time x stride) do not wrap past 2^31 elements: the 1.4B in_proj output at batch 128, any in_proj view at
    1M tokens. Hot loops pass WIDE=`wide_offsets(...)`: 64-bit address math cost the Mamba-1 scan 10%."""
    pid = tl.program_id(axis)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid


def wide_offsets(*tensors: torch.Tensor | None) -> bool:
    """True when a kernel's offsets into one of these tensors (views: into its storage) can reach 2^31 elements."""
    return any(t is not None and t.untyped_storage().nbytes() >= INT32_ELEMENTS * t.element_size() for t in tensors)


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under programmatic dependent launch (`mambakit.ops._common.overlapped_launches`): wait until the kernel
    before this one has finished (its outputs are this one's inputs, its inputs may be overwritten), then let
    the next kernel start its loads."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
