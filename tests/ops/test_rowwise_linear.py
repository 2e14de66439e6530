"""rowwise_linear (a one-row product as a reduction) equals F.linear up to summation order, eagerly and
compiled; RowwiseProducts sends only one-row CPU products to it."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops.rowwise_linear import RowwiseProducts, is_one_row, rowwise_linear

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                                    reason="inductor's CPU kernels need a C++ compiler")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (1, 1), ()])
def test_equals_linear(dtype, lead):
    x = torch.randn(*lead, 37, dtype=dtype)
    weight, bias = torch.randn(23, 37, dtype=dtype), torch.randn(23, dtype=dtype)
    got = rowwise_linear(x, weight, bias=bias)
    assert got.shape == (*lead, 23) and got.dtype == dtype
    torch.testing.assert_close(got.float(), F.linear(x.float(), weight.float(), bias.float()), **TOL[dtype])


def test_int8_weight_with_scales_equals_the_dequantized_product():
    x = torch.randn(1, 40, dtype=torch.bfloat16)
    q = torch.randint(-127, 128, (19, 40), dtype=torch.int8)
    scales = torch.rand(19) / 100
    want = F.linear(x.float(), q.float() * scales[:, None])
    torch.testing.assert_close(rowwise_linear(x, q, scales).float(), want, **TOL[torch.bfloat16])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_after_a_norm_equals_eager(dtype):
    """The row comes out of a norm (the case as_strided keeps inductor from recomputing per output)."""
    norm = torch.nn.RMSNorm(64, dtype=dtype)
    weight = torch.randn(300, 64, dtype=dtype)

    def f(x):
        return rowwise_linear(norm(x), weight)

    x = torch.randn(1, 64, dtype=dtype)
    with torch.no_grad():
        row = norm(x)
        got, want = torch.compile(f)(x).float(), F.linear(row, weight).float()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, **TOL[dtype])
        else:
            # Eagerly the norm's output is rounded to bf16, compiled it stays fp32, and both results are
            # rounded once: each part is at most one bf16 unit (2^-8 relative) of |weight| @ |row|.
            bound = 3 * 2.0 ** -8 * (weight.float().abs() @ row.float().abs().reshape(-1))
            err = (got - want).abs().reshape(-1)
            assert (err <= bound + 1e-6).all(), (err / bound).max()


def test_mode_takes_one_row_products_only():
    weight = torch.randn(7, 5)
    one, two = torch.randn(1, 5), torch.randn(2, 5)
    assert is_one_row(one) and not is_one_row(two)
    with RowwiseProducts():
        got_one, got_two = F.linear(one, weight), F.linear(two, weight)
    torch.testing.assert_close(got_one, rowwise_linear(one, weight), atol=0, rtol=0)
    assert torch.equal(got_two, F.linear(two, weight))
