"""RMSNorm (with fused residual add) and gated RMSNorm against float64 formulas written here, on every path."""
import os

import pytest
import torch

import mambakit.ops.norm as norm_module
from mambakit.ops import RMSNorm, RMSNormGated, rms_norm, rms_norm_gated
from mambakit.ops._common import triton_available


def available(impls):
    """Paths to test on these CPU tensors: Triton only through its interpreter (test_triton_*.py runs it on a GPU)."""
    interpreted = triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
    return [name for name in impls if name != "triton" or interpreted]


BACKENDS = available(norm_module._IMPLS)
GATED_BACKENDS = available(norm_module._GATED_IMPLS)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def float64_rms(x, weight, eps):
    x = x.double()
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / x.shape[-1] + eps) * weight.double()


def float64_gated(x, weight, z, eps, group_size, norm_before_gate):
    x = x.double()
    gate = None if z is None else z.double() * torch.sigmoid(z.double())
    if gate is not None and not norm_before_gate:
        x = x * gate
    hidden = x.shape[-1]
    size = group_size or hidden
    pieces = [float64_rms(x[..., i:i + size], torch.ones(size), eps) for i in range(0, hidden, size)]
    out = torch.cat(pieces, dim=-1) * weight.double()
    return out * gate if gate is not None and norm_before_gate else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (3, 64), (2, 5, 48)], ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_rms_norm_matches_float64(backend, shape, dtype, tol):
    x, weight = (torch.randn(shape) * 3).to(dtype), (1 + torch.randn(shape[-1])).to(dtype)
    eps = 10 ** torch.empty(1).uniform_(-6, -3).item()
    out = rms_norm(x, weight, eps=eps, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, float64_rms(x, weight, eps)) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_residual_add(backend, dtype, tol, residual_in_fp32, with_residual):
    x, weight = torch.randn(4, 6, 32).to(dtype), torch.randn(32)
    residual = torch.randn(4, 6, 32).to(dtype) if with_residual else None
    out, new_residual = rms_norm(x, weight, residual=residual, prenorm=True, residual_in_fp32=residual_in_fp32,
                                 backend=backend)
    summed = x.double() + (residual.double() if with_residual else 0)
    assert out.dtype == dtype
    assert new_residual.dtype == (torch.float32 if residual_in_fp32 else dtype)
    assert rel_err(new_residual, summed) < tol
    assert rel_err(out, float64_rms(summed, weight, 1e-5)) < tol
    plain = rms_norm(x, weight, residual=residual, residual_in_fp32=residual_in_fp32, backend=backend)
    assert torch.equal(plain, out)


@pytest.mark.parametrize("backend", GATED_BACKENDS)
@pytest.mark.parametrize("group_size", [None, 8, 16])
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gated_matches_float64(backend, group_size, norm_before_gate, with_z, dtype, tol):
    x, weight = torch.randn(3, 5, 32).to(dtype), torch.randn(32)
    z = torch.randn(3, 5, 32).to(dtype) if with_z else None
    out = rms_norm_gated(x, weight, z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate,
                         backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, float64_gated(x, weight, z, 1e-5, group_size, norm_before_gate)) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64(backend):
    leaves = [torch.randn(4, 24).requires_grad_(), torch.randn(24).requires_grad_(), torch.randn(4, 24).requires_grad_()]
    out, new_residual = rms_norm(*leaves[:2], residual=leaves[2], prenorm=True, residual_in_fp32=True, backend=backend)
    grad_out, grad_res = torch.randn_like(out), torch.randn_like(new_residual)
    grads = torch.autograd.grad((out, new_residual), leaves, (grad_out, grad_res))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    summed = leaves64[0] + leaves64[2]
    ref_grads = torch.autograd.grad((float64_rms(summed, leaves64[1], 1e-5), summed), leaves64,
                                    (grad_out.double(), grad_res.double()))
    for g, ref_g in zip(grads, ref_grads):
        assert rel_err(g, ref_g) < 1e-5


@pytest.mark.parametrize("backend", GATED_BACKENDS)
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_gradients_match_float64(backend, norm_before_gate):
    leaves = [torch.randn(4, 24).requires_grad_(), torch.randn(24).requires_grad_(), torch.randn(4, 24).requires_grad_()]
    out = rms_norm_gated(leaves[0], leaves[1], leaves[2], group_size=8, norm_before_gate=norm_before_gate,
                         backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = float64_gated(leaves64[0], leaves64[1], leaves64[2], 1e-5, 8, norm_before_gate)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    for g, ref_g in zip(grads, ref_grads):
        assert rel_err(g, ref_g) < 1e-5


def test_gradcheck_reference():
    x, weight, residual, z = (torch.randn(shape, dtype=torch.float64, requires_grad=True)
                              for shape in [(2, 6), (6,), (2, 6), (2, 6)])

    def fused(x, weight, residual):
        return rms_norm(x, weight, residual=residual, prenorm=True, backend="reference")

    def gated(x, weight, z):
        return (rms_norm_gated(x, weight, z, group_size=3, norm_before_gate=True, backend="reference"),
                rms_norm_gated(x, weight, z, group_size=2, norm_before_gate=False, backend="reference"))

    assert torch.autograd.gradcheck(fused, (x, weight, residual))
    assert torch.autograd.gradcheck(gated, (x, weight, z))


def test_modules_hold_weight_and_match_functions():
    norm = RMSNorm(16, eps=1e-6, dtype=torch.float64)
    assert list(norm.state_dict()) == ["weight"] and norm.weight.dtype == torch.float64
    assert torch.equal(norm.weight, torch.ones(16, dtype=torch.float64))
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    assert rel_err(norm(x), float64_rms(x, norm.weight, 1e-6)) < 1e-12
    out, summed = norm(x, residual=residual, prenorm=True)
    assert rel_err(out, float64_rms(x + residual, norm.weight, 1e-6)) < 1e-12

    gated = RMSNormGated(16, eps=1e-5, group_size=4, norm_before_gate=False)
    assert list(gated.state_dict()) == ["weight"] and gated.weight.shape == (16,)
    with torch.no_grad():
        gated.weight.normal_()
    x, z = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    assert rel_err(gated(x, z), float64_gated(x, gated.weight, z, 1e-5, 4, False)) < 1e-5
    loaded = RMSNormGated(16, group_size=4, norm_before_gate=False)
    loaded.load_state_dict(gated.state_dict())
    assert torch.equal(loaded(x, z), gated(x, z))


def test_bad_inputs_name_the_argument():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8\), got \(7,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual: expected shape"):
        rms_norm(x, torch.ones(8), residual=torch.randn(1, 8))
    with pytest.raises(TypeError, match="x: expected dtype"):
        rms_norm(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="z: expected shape"):
        rms_norm_gated(x, torch.ones(8), torch.randn(3, 4))
    with pytest.raises(ValueError, match="group_size: expected a divisor of hidden size 8, got 3"):
        rms_norm_gated(x, torch.ones(8), group_size=3)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, torch.ones(8), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        rms_norm_gated(x, torch.ones(8), backend="nope")


@pytest.mark.parametrize("gated,backend", [(False, b) for b in BACKENDS] + [(True, b) for b in GATED_BACKENDS])
def test_non_contiguous_input(gated, backend):
    x, z, weight = torch.randn(16, 3, 5).transpose(0, 2), torch.randn(16, 3, 5).transpose(0, 2), torch.randn(16)
    if gated:
        out, ref = rms_norm_gated(x, weight, z, group_size=8, backend=backend), float64_gated(x, weight, z, 1e-5, 8, True)
    else:
        out, ref = rms_norm(x, weight, backend=backend), float64_rms(x, weight, 1e-5)
    assert rel_err(out, ref) < 1e-5
