"""Triton helpers shared by the ops' kernels (imported only where Triton is)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def program_index(axis: tl.constexpr):
    """tl.program_id in int64, so that the offsets built from it (batch x stride, row x stride, time x stride)
    do not wrap past 2^31 elements: the 1.4B in_proj output at batch 128, any in_proj view at 1M tokens."""
    return tl.program_id(axis).to(tl.int64)
