"""The SSD is causal for every value, NaN and inf included: a non-finite input at step t leaves every
earlier output as it was and makes step t and every later step of its sequence non-finite (what the
recurrence does), in the reference and in the Triton kernels (interpreted on the CPU)."""
import importlib

import pytest
import torch

from mambakit.ops._common import triton_available

ssd_ops = importlib.import_module("mambakit.ops.ssd")  # the package; the function shadows it
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"] + (["triton"] if triton_available() else [])


def inputs(batch=2, length=40, nheads=2, headdim=4, N=4):
    kw = dict(device=DEVICE)
    return dict(x=torch.randn(batch, length, nheads, headdim, **kw), dt=torch.randn(batch, length, nheads, **kw),
                A=-(torch.rand(nheads, **kw) + 0.1), B=torch.randn(batch, length, 1, N, **kw),
                C=torch.randn(batch, length, 1, N, **kw), D=torch.randn(nheads, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [("x", float("nan")), ("x", float("inf")), ("B", float("nan")),
                                        ("dt", float("nan"))])
def test_a_non_finite_input_reaches_only_its_step_and_later(backend, name, value):
    args = inputs()
    length, chunk = args["x"].shape[1], 16
    t = int(torch.randint(1, length - 1, ()))  # inside a chunk, at a random place
    clean = ssd_ops.ssd(**args, chunk_size=chunk, dt_softplus=True, backend=backend)
    args[name] = args[name].clone()
    args[name][1, t] = value  # row 1 only: row 0 must not notice
    out = ssd_ops.ssd(**args, chunk_size=chunk, dt_softplus=True, backend=backend)
    torch.testing.assert_close(out[0], clean[0])
    torch.testing.assert_close(out[1, :t], clean[1, :t])
    assert not out[1, t:].isfinite().any()
