"""Decode steps on a bf16 / fp16 state (GenerationOptions.state_dtype): fp32 math, the state rounded once per
step. Checked against an fp32 state rounded to the half dtype after every step, and against the fp32 state
itself, on every step path (Triton in its CPU interpreter, on tiny shapes)."""
import importlib
import os

import pytest
import torch

from mambakit.bench.common import rel_err
from mambakit.ops import selective_state_update, ssd_state_update
from mambakit.ops._common import triton_available

HALVES = [torch.bfloat16, torch.float16]
HALF_EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
STEPS = 6
# Triton's CPU interpreter rounds fp32 -> bf16 toward zero (a GPU, and torch, to nearest even).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rounded(state: torch.Tensor, half: torch.dtype, toward_zero: bool) -> torch.Tensor:
    """fp32 `state` rounded to `half` as the kernel rounds it, back in fp32."""
    if toward_zero:  # bf16 is fp32's upper half: drop the lower 16 bits
        return (state.view(torch.int32) & -65536).view(torch.float32)
    return state.to(half).float()


def step_backends(module: str) -> list[str]:
    impls = importlib.import_module(module)._STEP_IMPLS
    return [name for name in impls if name != "triton" or triton_available()]


def randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def ssd_steps(batch=3, nheads=4, headdim=5, ngroups=2, N=6):
    """(initial state, one call per step taking the state): Mamba-2 decode steps with D, z, dt_bias, softplus."""
    state = randn(batch, nheads, headdim, N)
    A, D, bias = -(torch.rand(nheads, device=DEVICE) + 0.1), randn(nheads, headdim), randn(nheads)
    inputs = [dict(x=randn(batch, nheads, headdim), dt=randn(batch, nheads),
                   B=randn(batch, ngroups, N), C=randn(batch, ngroups, N), z=randn(batch, nheads, headdim))
              for _ in range(STEPS)]
    return state, [lambda s, backend, i=i: ssd_state_update(s, A=A, D=D, dt_bias=bias, dt_softplus=True,
                                                            backend=backend, **i) for i in inputs]


def mamba1_steps(batch=3, dim=8, N=4):
    """(initial state, one call per step taking the state): Mamba-1 decode steps as the layer makes them."""
    state = randn(batch, dim, N)
    A_log, D, bias = randn(dim, N), randn(dim), randn(dim)
    inputs = [dict(x=randn(batch, dim), dt=randn(batch, dim), B=randn(batch, N),
                   C=randn(batch, N), z=randn(batch, dim)) for _ in range(STEPS)]
    return state, [lambda s, backend, i=i: selective_state_update(s, A=None, A_log=A_log, D=D, dt_bias=bias,
                                                                  dt_softplus=True, backend=backend, **i)
                   for i in inputs]


CASES = [(ssd_steps, backend) for backend in step_backends("mambakit.ops.ssd")] + \
        [(mamba1_steps, backend) for backend in step_backends("mambakit.ops.selective_scan")]


@pytest.mark.parametrize("half", HALVES, ids=str)
@pytest.mark.parametrize("make,backend", CASES, ids=lambda c: getattr(c, "__name__", c))
def test_half_state_is_fp32_math_rounded_once_per_step(make, backend, half):
    state0, steps = make()
    half_state = state0.to(half)
    storage = half_state.data_ptr()
    emulated = half_state.float()  # fp32, rounded to `half` after every step
    exact = half_state.float()  # fp32 throughout, from the same start
    toward_zero = INTERPRETED and backend == "triton" and half == torch.bfloat16
    outs = {"half": [], "emulated": [], "exact": []}
    for step in steps:
        outs["half"].append(step(half_state, backend))
        outs["emulated"].append(step(emulated, backend))
        emulated.copy_(rounded(emulated, half, toward_zero))
        outs["exact"].append(step(exact, backend))
    assert half_state.dtype == half and half_state.data_ptr() == storage  # updated in place, kept in its dtype
    got, emulated_out, exact_out = (torch.stack(o) for o in outs.values())
    # Rounding once per step leaves only the fp32 math's order between the paths (a rare one-unit flip).
    assert rel_err(got, emulated_out) < HALF_EPS[half] / 10
    assert rel_err(half_state, emulated) < HALF_EPS[half] / 10
    # The drift from an fp32 state: a few units of rounding per step, not more.
    assert rel_err(got, exact_out) < 2 * STEPS * HALF_EPS[half]
    assert rel_err(half_state, exact) < 2 * STEPS * HALF_EPS[half]
