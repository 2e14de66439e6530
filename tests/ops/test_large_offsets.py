"""Kernels reading views of one wide buffer past 2^31 elements, as the layers pass views of the in_proj output
(Mamba-2 1.4B at batch 128: 2.2e9 elements; any in_proj view at 1M tokens). The last batch row must equal the
same op on a contiguous copy of that row: a 32-bit offset wraps there and reads other memory. GPU only: the
buffer is 4.4 GB."""
import pytest
import torch

from mambakit.ops import causal_conv1d, rms_norm, rms_norm_gated, selective_scan, ssd

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a 4.4 GB buffer)")

BATCH, LENGTH, WIDTH = 2, 2**17, 8448  # the last row's elements lie past 2^31 (BATCH * LENGTH * WIDTH)


def test_wide_offsets_follows_the_storage():
    pytest.importorskip("triton")
    from mambakit.ops._triton import wide_offsets

    big = torch.empty(2**31, dtype=torch.uint8)  # not touched: no memory is committed
    small = torch.empty(2**31 // 4 - 1, dtype=torch.float32)
    assert wide_offsets(None, big) and wide_offsets(big[:8]), "a view into a wide storage is wide"
    assert not wide_offsets(small, None, torch.empty(0)), "2^31 bytes of fp32 are fewer than 2^31 elements"


@pytest.fixture(scope="module")
def wide():
    """(BATCH, LENGTH, WIDTH) fp16 of fresh random values, a stand-in for an in_proj output."""
    torch.manual_seed(0)
    buf = torch.randn(BATCH, LENGTH, WIDTH, device="cuda", dtype=torch.float16)
    assert buf.numel() > 2**31
    yield buf
    del buf
    torch.cuda.empty_cache()


def last_row(*tensors):
    """Contiguous copies of each tensor's last batch row."""
    return [t[-1:].contiguous() for t in tensors]


def assert_last_row_equal(out, ref):
    torch.testing.assert_close(out[-1:], ref, rtol=1e-3, atol=1e-3)


@needs_gpu
def test_conv1d_on_a_channels_last_view(wide):
    x = wide[..., -256:].transpose(1, 2)  # (batch, dim, L) with the L stride WIDTH
    weight = torch.randn(256, 4, device="cuda", dtype=torch.float16)
    out = causal_conv1d(x, weight, activation="silu")
    assert_last_row_equal(out, causal_conv1d(*last_row(x), weight, activation="silu"))


@needs_gpu
def test_ssd_on_views(wide):
    nheads, headdim, state = 4, 64, 64
    x, z, B, C, dt = wide[..., -(2 * nheads * headdim + 2 * state + nheads):].split(
        [nheads * headdim, nheads * headdim, state, state, nheads], dim=-1)
    x, z = x.unflatten(-1, (nheads, headdim)), z.unflatten(-1, (nheads, headdim))
    B, C = B.unsqueeze(2), C.unsqueeze(2)
    A = -torch.rand(nheads, device="cuda")
    D = torch.randn(nheads, device="cuda")
    dt_bias = torch.randn(nheads, device="cuda")
    out = ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    ref = ssd(*last_row(x, dt), A, *last_row(B, C), D=D, z=last_row(z)[0], dt_bias=dt_bias, dt_softplus=True)
    assert_last_row_equal(out, ref)


@needs_gpu
def test_selective_scan_on_channels_last_views(wide):
    dim, state = 128, 16
    u, delta, z = (v.transpose(1, 2) for v in wide[..., -3 * dim:].split(dim, dim=-1))
    B, C = (v.transpose(1, 2).unsqueeze(1) for v in wide[..., :2 * state].split(state, dim=-1))
    A = -torch.rand(dim, state, device="cuda")
    out = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True)
    ref = selective_scan(*last_row(u, delta), A, *last_row(B, C), z=last_row(z)[0], delta_softplus=True)
    assert_last_row_equal(out, ref)


@needs_gpu
def test_norms_on_row_views(wide):
    x, residual, z = wide[..., -768:].split(256, dim=-1)  # rows of stride WIDTH
    weight = torch.rand(256, device="cuda", dtype=torch.float16) + 0.5
    out, summed = rms_norm(x, weight, residual=residual, prenorm=True)
    ref, ref_summed = rms_norm(*last_row(x), weight, residual=last_row(residual)[0], prenorm=True)
    assert_last_row_equal(out, ref)
    assert_last_row_equal(summed, ref_summed)
    gated = rms_norm_gated(x, weight, z=z, group_size=128)
    assert_last_row_equal(gated, rms_norm_gated(*last_row(x), weight, z=last_row(z)[0], group_size=128))
