"""Every registered mambakit custom op passes `torch.library.opcheck` (schema, fake kernel, autograd
registration, AOT dispatch) on CPU tensors through the Triton interpreter, with inputs laid out as the
layers pass them: column slices and transposes of one projection output, not fresh contiguous tensors.

A fake kernel whose output strides differ from the real op's makes torch.compile fail at run time
(inductor asserts the strides); opcheck's fake-tensor test compares them."""
import os

import pytest
import torch

from mambakit.ops._common import triton_available

pytestmark = pytest.mark.skipif(
    not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the custom ops run Triton kernels: on CPU tensors only through TRITON_INTERPRET=1")


def _import_ops():
    """Importing the Triton paths registers their custom ops (the CPU scan's come with mambakit.ops)."""
    from mambakit.ops.conv1d import triton_conv, triton_step as conv_step  # noqa: F401
    from mambakit.ops.norm import triton_norm  # noqa: F401
    from mambakit.ops.norm_linear import triton_decode  # noqa: F401
    from mambakit.ops.selective_scan import triton_scan, triton_step as scan_step  # noqa: F401
    from mambakit.ops.ssd import triton_ssd, triton_step as ssd_step  # noqa: F401
    from mambakit import prepacking  # noqa: F401  (oneDNN's product on a prepacked weight)


def columns(batch, length, *widths, grad=False):
    """Slices along the last dim of one contiguous (batch, length, sum(widths)) tensor, as `in_proj(x).split`."""
    whole = torch.randn(batch, length, sum(widths))
    return [p.detach().requires_grad_(grad) for p in whole.split(list(widths), dim=-1)]


def transposed(*shape, grad=False):
    """A dense tensor of `shape` whose last two dims are swapped in memory (strides of a .transpose)."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2).requires_grad_(grad)


def param(*shape):
    return torch.randn(*shape, requires_grad=True)


def detached(args):
    """The inputs of a backward op: no gradient through them (backward ops are not differentiable)."""
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def op(name):
    return getattr(torch.ops.mambakit, name).default


# --- conv1d: x is (batch, dim, L), in the layers a transposed slice of in_proj's (batch, L, 2 * dim) ---
B, D, L, W = 2, 24, 40, 4


def conv_fwd_samples():
    x_slice = columns(B, L, D, D, grad=True)[0].transpose(1, 2)
    seq_idx = torch.tensor([[0] * 15 + [1] * 25, [0] * 40], dtype=torch.int32)
    yield x_slice, param(D, W), param(D), None, None, True
    yield transposed(B, D, L, grad=True), param(D, W), None, transposed(B, D, W - 1, grad=True), None, False
    yield torch.randn(B, D, L, requires_grad=True), param(D, W), param(D), None, seq_idx, True
    # Mamba's x: the first half of in_proj's output laid out (2 * dim, batch, L) (weight @ tokens^T)
    yield torch.randn(2 * D, B, L)[:D].permute(1, 0, 2).requires_grad_(), param(D, W), param(D), None, None, True


def conv_bwd_samples():
    douts = (transposed(B, D, L), torch.randn(B, D, L), torch.randn(B, D, L), torch.randn(D, B, L).permute(1, 0, 2))
    for dout, (x, weight, bias, init, seq_idx, silu) in zip(douts, conv_fwd_samples()):
        yield detached((dout, x, weight, bias, init, seq_idx, silu))


def conv_update_samples():
    x, _ = columns(B, 1, D, D)
    yield x.squeeze(1), torch.randn(B, D, W), torch.randn(D, W), torch.randn(D), True
    yield transposed(B, D), torch.randn(B, D, W), torch.randn(D, W), None, False


# --- RMS norms: rows of x (..., hidden); z and the residual as the layers pass them; a program per
# row (group), hence few rows ---
H, NL = 32, 6


def norm_fwd_samples():
    x, z = columns(B, NL, H, H, grad=True)
    yield x, None, z, param(H), 1e-5, H // 2, False, False, torch.float32  # gated, grouped (Mamba-2)
    yield transposed(B, NL, H, grad=True), None, transposed(B, NL, H, grad=True), param(H), 1e-5, H, True, False, \
        torch.float32
    yield transposed(B, NL, H, grad=True), torch.randn(B, NL, H, requires_grad=True), None, param(H), 1e-6, H, False, \
        True, torch.float32  # fused add + norm, prenorm


def norm_linear_samples():
    """Decode rows: x and z cut from one projection (Mamba-2's out_proj input), or the residual stream; the
    last five arguments are the conv epilogue (state, weight, bias, offset, silu) or its absence."""
    x, z = (t.squeeze(1) for t in columns(B, 1, H, H))
    no_conv = (None, None, None, 0, False)
    yield x, None, z, torch.randn(H), torch.randn(24, H), 1e-5, H // 2, True, None, *no_conv
    yield x, torch.randn(B, H), None, torch.randn(H), torch.randn(24, H), 1e-5, H, False, torch.float32, *no_conv
    # the conv step as epilogue on output columns 4..12 (Mamba-2's xBC), its state updated in place
    yield x, torch.randn(B, H), None, torch.randn(H), torch.randn(24, H), 1e-5, H, False, torch.float32, \
        torch.randn(B, 8, W), torch.randn(8, W), torch.randn(8), 4, True
    yield x, None, None, None, torch.randn(3, H), 0.0, H, False, None, *no_conv  # no norm: a linear layer alone


def norm_bwd_samples():
    for x, residual, z, weight, eps, group_size, gate_first, store_res, res_dtype in norm_fwd_samples():
        rstd = op("rms_norm_fwd")(x, residual, z, weight, eps, group_size, gate_first, store_res, res_dtype)[2]
        dres = transposed(B, NL, H) if store_res else None
        yield detached((transposed(B, NL, H), dres, x, residual, z, weight, rstd, group_size, gate_first))


# --- selective scan: u, delta, z (batch, dim, L) with unit stride along L (the wrapper ensures it); the
# backward runs one program per channel, slow in the interpreter: few channels, short L ---
SD, N, SL = 4, 4, 12


def scan_fwd_samples():
    u, delta, z = columns(B, SD, SL, SL, SL, grad=True)  # rows of one buffer
    Bm, Cm = columns(B, N, SL, SL, grad=True)
    A = -torch.rand(SD, N).add(0.5).requires_grad_()
    yield u, delta, A, Bm, Cm, param(SD), z, param(SD), True, None, None, True
    seq_idx = torch.tensor([[0] * 5 + [1] * 7], dtype=torch.int32)
    yield torch.randn(1, SD, SL, requires_grad=True), torch.rand(1, SD, SL).requires_grad_(), A, \
        torch.randn(1, 2, N, SL, requires_grad=True), torch.randn(1, 2, N, SL, requires_grad=True), None, None, None, \
        False, torch.randn(1, SD, N, requires_grad=True), seq_idx, True


def scan_bwd_samples():
    for u, delta, A, Bm, Cm, Dv, z, bias, softplus, h0, seq_idx, _ in scan_fwd_samples():
        ckpt = op("selective_scan_fwd")(u, delta, A, Bm, Cm, Dv, z, bias, softplus, h0, seq_idx, True)[2]
        yield detached((transposed(*u.shape), torch.randn(u.shape[0], SD, N), u, delta, A, Bm, Cm, Dv, z, bias,
                        seq_idx, ckpt, softplus, h0 is not None))


def cpu_scan_fwd_samples():
    """The CPU path's recurrence, time-major: delta, delta_u (L, batch, dim), B, C (L, batch, G, N)."""
    A = -torch.rand(SD, N).add(0.5).requires_grad_()
    yield torch.rand(SL, B, SD).requires_grad_(), param(SL, B, SD), A, param(SL, B, 1, N), param(SL, B, 2, N), \
        torch.zeros(B, SD, N), None
    keep = torch.ones(SL, B)
    keep[5, 0] = 0.0  # a new sequence starts there
    yield torch.rand(SL, B, SD).requires_grad_(), param(SL, B, SD), A, param(SL, B, 2, N), param(SL, B, 1, N), \
        param(B, SD, N), keep


def cpu_scan_bwd_samples():
    for delta, delta_u, A, Bm, Cm, h0, keep in cpu_scan_fwd_samples():
        states = op("selective_scan_cpu_fwd")(delta, delta_u, A, Bm, Cm, h0, keep)[2]
        yield detached((transposed(SL, B, SD), torch.randn(B, SD, N), delta, delta_u, A, Bm, Cm, h0, keep, states))


def scan_update_samples():
    R = 3
    x, z, dt = (t.squeeze(1) for t in columns(B, 1, SD, SD, R))
    Bm, Cm = (t.squeeze(1) for t in columns(B, 1, N, N))
    yield torch.randn(B, SD, N), x, dt, torch.randn(SD, N), Bm, Cm, torch.randn(SD), z, torch.randn(SD), True, True, \
        torch.randn(SD, R)
    yield torch.randn(B, SD, N), transposed(B, SD), transposed(B, SD), -torch.rand(SD, N), torch.randn(B, N), \
        torch.randn(B, N), None, None, None, False, False, None


# --- SSD: x, z (batch, L, nheads, headdim), B, C (batch, L, ngroups, N), dt (batch, L, nheads): views of
# in_proj's output (z, dt) and of the conv output (x, B, C); 1.5 chunks (the interpreter is slow) ---
NH, P, G, NS, Q, QL = 2, 8, 1, 16, 16, 24


def ssd_fwd_samples():
    z, xBC, dt = columns(B, QL, NH * P, NH * P + 2 * G * NS, NH, grad=True)
    x, Bm, Cm = xBC.split([NH * P, G * NS, G * NS], dim=-1)
    x, z = x.unflatten(-1, (NH, P)), z.unflatten(-1, (NH, P))
    Bm, Cm = Bm.unflatten(-1, (G, NS)), Cm.unflatten(-1, (G, NS))
    A = -torch.rand(NH).add(0.5).requires_grad_()
    yield x, dt, A, Bm, Cm, Q, param(NH), z, param(NH), True, 0.0, float("inf"), None, None, None, False, True
    seq_idx = torch.tensor([[0] * 10 + [1] * 14], dtype=torch.int32)
    cu_seqlens = torch.tensor([0, 10, 24], dtype=torch.int32)
    yield transposed(1, QL, NH, P, grad=True), torch.rand(1, QL, NH, requires_grad=True), A, \
        torch.randn(1, QL, G, NS, requires_grad=True), torch.randn(1, QL, G, NS, requires_grad=True), Q, \
        param(NH, P), None, None, False, 0.0, float("inf"), torch.randn(1, NH, P, NS, requires_grad=True), \
        seq_idx, cu_seqlens, True, True


def ssd_bwd_samples():
    for args in ssd_fwd_samples():
        x, dt, A, Bm, Cm, chunk, Dv, z, bias, softplus, dt_min, dt_max, init, seq_idx = args[:14]
        _, _, _, y, cs, dtp, states, cb = op("ssd_fwd")(*args)
        yield detached((transposed(*x.shape), torch.randn(x.shape[0], NH, P, NS), x, dt, A, Bm, Cm, chunk, Dv, z,
                        bias, softplus, dt_min, dt_max, init, seq_idx, y, cs, dtp, states, cb))


def ssd_update_samples():
    x, z = (t.squeeze(1).unflatten(-1, (NH, P)) for t in columns(B, 1, NH * P, NH * P))
    Bm, Cm, dt = (t.squeeze(1) for t in columns(B, 1, G * NS, G * NS, NH))
    Bm, Cm = Bm.unflatten(-1, (G, NS)), Cm.unflatten(-1, (G, NS))
    yield torch.randn(B, NH, P, NS), x, dt, torch.randn(NH), Bm, Cm, torch.randn(NH), z, torch.randn(NH), True, \
        0.0, float("inf"), True
    yield torch.randn(B, NH, P, NS), transposed(B, NH, P), torch.randn(B, NH), -torch.rand(NH), \
        torch.randn(B, G, NS), torch.randn(B, G, NS), torch.randn(NH, P), None, None, False, 0.01, 0.5, False


def packed_linear_samples():
    if not torch.backends.mkldnn.is_available():
        return
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(24, H, dtype=dtype))
        yield torch.randn(3, H, dtype=dtype), weight, None
        yield torch.randn(1, H, dtype=dtype), weight, torch.randn(24, dtype=dtype)


SAMPLES = {
    "causal_conv1d_fwd": conv_fwd_samples,
    "causal_conv1d_bwd": conv_bwd_samples,
    "causal_conv1d_update": conv_update_samples,
    "rms_norm_fwd": norm_fwd_samples,
    "rms_norm_bwd": norm_bwd_samples,
    "norm_linear": norm_linear_samples,
    "selective_scan_fwd": scan_fwd_samples,
    "selective_scan_bwd": scan_bwd_samples,
    "selective_state_update": scan_update_samples,
    "selective_scan_cpu_fwd": cpu_scan_fwd_samples,
    "selective_scan_cpu_bwd": cpu_scan_bwd_samples,
    "ssd_fwd": ssd_fwd_samples,
    "ssd_bwd": ssd_bwd_samples,
    "ssd_state_update": ssd_update_samples,
    "packed_linear": packed_linear_samples,
}


# opcheck's schema, autograd and fake-tensor tests read data pointers, which a tensor in oneDNN's layout lacks;
# the fake kernel is exercised by tests/generation/test_compiled_decode.py (the compiled step equals eager).
UNCHECKED = {"packed_linear": {"test_schema", "test_autograd_registration", "test_faketensor"}}


def test_every_registered_op_has_samples():
    _import_ops()
    registered = {name.removeprefix("mambakit::") for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("mambakit::")}
    assert registered == set(SAMPLES)


@pytest.fixture
def short_scan_tiles(monkeypatch):
    """16-step tiles: the interpreter runs a whole tile whatever L (tile sizes change speed, not results)."""
    from mambakit.ops.selective_scan import triton_scan

    monkeypatch.setattr(triton_scan, "TILE_L", 16)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name, short_scan_tiles):
    _import_ops()
    checks = tuple(check for check in torch.library._OPCHECK_DEFAULT_UTILS if check not in UNCHECKED.get(name, ()))
    for args in SAMPLES[name]():
        torch.library.opcheck(op(name), args, test_utils=checks)
