"""Helpers shared by every op: choosing an implementation, checking arguments, and running a
Triton op eagerly without the custom-op dispatcher."""
from __future__ import annotations

import contextvars
import functools
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch

BACKENDS = ("reference", "cpu", "triton")
BACKEND_ENV = "MAMBAKIT_BACKEND"

_overlap = contextvars.ContextVar("mambakit_overlapped_launches", default=False)


@functools.cache  # asked on every op call: the import statement alone costs microseconds
def triton_available() -> bool:
    """True when Triton can run here: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def choose_backend(backend: str | None, x: torch.Tensor, available: Sequence[str]) -> str:
    """Name of the implementation to run for an op whose main input is `x`.

    Order: the `backend` argument, then the MAMBAKIT_BACKEND environment variable, then the
    device default (Triton on CUDA, the CPU path on CPU, falling back to the reference).
    An explicit request for an implementation the op lacks is an error, never a silent swap.
    """
    requested = backend or os.environ.get(BACKEND_ENV) or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {requested!r}")
        if requested not in available:
            if backend is None and requested != "reference":
                # The environment variable asks for a path this op does not have: use the default.
                requested = None
            else:
                raise ValueError(f"backend: this op has {tuple(available)}, got {requested!r}")
        elif requested == "triton" and not triton_available():
            raise RuntimeError("backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if requested is not None:
        return requested
    if x.is_cuda and "triton" in available and triton_available():
        return "triton"
    if x.device.type == "cpu" and "cpu" in available:
        return "cpu"
    return "reference"


def dispatch(impls: Mapping[str, Callable[[], Callable]], backend: str | None, x: torch.Tensor) -> Callable:
    """Return the function for the chosen backend; `impls` maps names to loaders so Triton imports lazily."""
    return impls[choose_backend(backend, x, tuple(impls))]()


def check_shape(name: str, t: torch.Tensor | None, *dims: int | None) -> None:
    """Raise ValueError unless `t` has exactly these dims (None matches any size)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    shape = tuple(t.shape)
    ok = len(shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, shape))
    if not ok:
        expected = "(" + ", ".join("*" if d is None else str(d) for d in dims) + ")"
        raise ValueError(f"{name}: expected shape {expected}, got {shape}")


def check_dtype(name: str, t: torch.Tensor | None, allowed: Sequence[torch.dtype]) -> None:
    """Raise TypeError unless `t` has one of the allowed dtypes."""
    if t is not None and t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")


def check_dtype_choice(name: str, dtype, allowed: Sequence) -> None:
    """Raise ValueError unless the dtype argument `dtype` (not a tensor's) is one of `allowed` (None may be one)."""
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name}: expected one of {names}, got {dtype!r}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# A decode step's recurrent state: fp32 (the default), fp64, or bf16 / fp16 to halve what each step reads and
# writes (the state is most of it at large batch); the step's math is fp32 whatever the state's dtype.
STEP_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def math_state(state: torch.Tensor) -> torch.Tensor:
    """The state that math runs on: `state` itself in fp32 / fp64, else an fp32 copy (a reference decode step
    writes it back; a scan continuing from a cached state takes it as its initial state)."""
    return state if state.dtype in (torch.float32, torch.float64) else state.float()


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError when the given tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must share a device: {listing}")


def eager_autograd(forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """The `apply` of an autograd.Function made of a custom op's pieces: `forward(*inputs)` (the op's
    body), `setup_context(ctx, inputs, outputs)` and `backward(ctx, *output_grads)` (calling the backward
    body). Same results as the registered op, without the dispatcher. Unused output gradients are None.
    With gradients disabled it calls `forward` alone (the Function's own host cost is ~20 us a call)."""

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.set_materialize_grads(False)
            outputs = forward(*inputs)
            setup_context(ctx, inputs, outputs)
            return outputs

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{forward.__name__}"

    def apply(*inputs):
        if not torch.is_grad_enabled():  # inference (prefill, decoding): nothing to record, skip the Function
            return forward(*inputs)
        return EagerOp.apply(*inputs)

    return apply


def custom_op_if_compiling(custom_op: Callable, eager: Callable) -> Callable:
    """`custom_op` while torch.compile traces (one opaque node in the graph), else `eager`: the same
    computation without the dispatcher, whose host cost (about 0.4 ms a call on an H200 host,
    benchmarks/results/kernels-h200-notes.md) exceeds the GPU time of small launches."""
    return custom_op if torch.compiler.is_compiling() else eager


@contextmanager
def overlapped_launches(enabled: bool = True) -> Iterator[None]:
    """Inside, the decode kernels (norm + linear, the SSD and selective-scan steps, the conv step) launch with
    programmatic dependent launch (sm_90 and later): each starts while the kernel before it runs and loads what
    that kernel cannot be writing (weights, its own recurrent state) before waiting for its inputs. Only for a
    sequence of decode steps whose weights stay fixed and whose states only those steps write: the decode step
    a `Decoder` captures in a CUDA graph."""
    token = _overlap.set(enabled)
    try:
        yield
    finally:
        _overlap.reset(token)


def overlap(device: torch.device) -> bool:
    """Whether kernels launched now on `device` overlap their predecessor (see `overlapped_launches`)."""
    return _overlap.get() and device.type == "cuda" and _supports_pdl(device.index)


@functools.lru_cache(maxsize=None)
def _supports_pdl(index: int | None) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9

