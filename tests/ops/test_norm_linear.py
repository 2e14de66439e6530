"""The fused norm + linear decode op: the Triton path (the interpreter on the CPU) against the unfused
reference (the norm's reference, then F.linear), that against float64 formulas written here."""
import pytest
import torch

from mambakit.bench.common import rel_err
from mambakit.ops import norm_linear
from mambakit.ops.conv1d import ConvStep
from mambakit.ops.norm_linear import triton_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def float64_norm(s, weight, eps, group_size):
    pieces = s.double().unflatten(-1, (-1, group_size))
    normed = pieces / torch.sqrt(pieces.pow(2).mean(-1, keepdim=True) + eps)
    return normed.flatten(-2) * weight.double()


def make(rows, hidden, out, dtype):
    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
    norm_w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    weight = (torch.randn(out, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    return x, norm_w, weight


@pytest.fixture(params=["one chunk", "chunks"])
def chunking(request, monkeypatch):
    """A group held at once, or walked in chunks of 128 channels (300: the third chunk partial)."""
    if request.param == "chunks":
        monkeypatch.setattr(triton_decode, "MAX_ONE_CHUNK", 128)
        monkeypatch.setattr(triton_decode, "BLOCK_K", 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual,residual_in_fp32", [(False, False), (False, True), (True, True),
                                                           (True, False)])
@pytest.mark.parametrize("rows", [1, 3])
def test_rms_norm_linear(dtype, with_residual, residual_in_fp32, rows, chunking):
    """Outputs of a 300-channel norm into 37 outputs; the summed residual exactly the reference's, in its
    dtype."""
    x, norm_w, weight = make(rows, 300, 37, dtype)
    residual = torch.randn(rows, 300, device=DEVICE) if with_residual else None
    args = dict(eps=1e-5, residual=residual, residual_in_fp32=residual_in_fp32)
    got, summed = norm_linear.rms_norm_linear(x, norm_w, weight, backend="triton", **args)
    want, want_summed = norm_linear.rms_norm_linear(x, norm_w, weight, backend="reference", **args)
    s = x.double() + (residual.double() if with_residual else 0)
    exact = float64_norm(s, norm_w, 1e-5, 300) @ weight.double().T
    assert got.dtype == want.dtype == dtype and got.shape == (rows, 37)
    assert rel_err(want, exact) < TOL[dtype] and rel_err(got, want) < TOL[dtype]
    assert summed.dtype == want_summed.dtype and torch.equal(summed, want_summed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [None, 100])
@pytest.mark.parametrize("gate", ["none", "before", "after"])
def test_rms_norm_gated_linear(dtype, group_size, gate, chunking):
    """Gated norm over one or three groups, the gate before or after the norm, or none."""
    x, norm_w, weight = make(2, 300, 24, dtype)
    z = None if gate == "none" else torch.randn(2, 300, device=DEVICE, dtype=dtype)
    args = dict(eps=1e-5, group_size=group_size, norm_before_gate=gate != "before")
    got = norm_linear.rms_norm_gated_linear(x, z, norm_w, weight, backend="triton", **args)
    want = norm_linear.rms_norm_gated_linear(x, z, norm_w, weight, backend="reference", **args)
    silu = None if z is None else z.double() * torch.sigmoid(z.double())
    s = x.double() * silu if gate == "before" else x.double()
    normed = float64_norm(s, norm_w, 1e-5, group_size or 300)
    exact = (normed * silu if gate == "after" else normed) @ weight.double().T
    assert rel_err(want, exact) < TOL[dtype] and rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,offset,bias,activation", [(1, 4, 0, True, "silu"), (3, 3, 21, False, None),
                                                                (2, 4, 33, True, None)])
def test_conv_step_epilogue(dtype, rows, width, offset, bias, activation):
    """A conv decode step on 37 of the 70 outputs (a mixer's in_proj and its conv): those columns convolved
    with the window shifted in place, the others as without it; Triton, reference and a float64 formula."""
    x, norm_w, weight = make(rows, 300, 70, dtype)
    dim = 37
    conv_w = torch.randn(dim, width, device=DEVICE, dtype=dtype)
    conv_b = torch.randn(dim, device=DEVICE, dtype=dtype) if bias else None
    state0 = torch.randn(rows, dim, width, device=DEVICE, dtype=dtype)
    outs, states = {}, {}
    for backend in ("triton", "reference"):
        states[backend] = state0.clone()
        conv = ConvStep(states[backend], conv_w, conv_b, activation, offset)
        outs[backend], _ = norm_linear.rms_norm_linear(x, norm_w, weight, backend=backend, conv=conv)
    plain, _ = norm_linear.rms_norm_linear(x, norm_w, weight, backend="triton")
    linear = float64_norm(x.double(), norm_w, 1e-5, 300) @ weight.double().T
    cols = slice(offset, offset + dim)
    window = torch.cat([state0.double()[..., 1:], linear[:, cols, None]], dim=-1)
    conv_out = (window * conv_w.double()).sum(-1) + (conv_b.double() if bias else 0)
    exact = linear.clone()
    exact[:, cols] = conv_out * torch.sigmoid(conv_out) if activation else conv_out
    others = torch.ones(70, dtype=torch.bool)
    others[cols] = False
    assert torch.equal(outs["triton"][:, others], plain[:, others])
    assert rel_err(outs["reference"], exact) < TOL[dtype] and rel_err(outs["triton"], outs["reference"]) < TOL[dtype]
    for got in states.values():
        assert rel_err(got, window) < TOL[dtype] and torch.equal(got[..., :-1], state0[..., 1:])


def test_strided_rows_are_read_in_place():
    """x and z as column slices of one projection (Mamba-2 cuts them from in_proj's output)."""
    packed = torch.randn(2, 700, device=DEVICE)
    x, z = packed[:, 50:350], packed[:, 400:700]
    _, norm_w, weight = make(2, 300, 16, torch.float32)
    got = norm_linear.rms_norm_gated_linear(x, z, norm_w, weight, norm_before_gate=False, backend="triton")
    want = norm_linear.rms_norm_gated_linear(x.contiguous(), z.contiguous(), norm_w, weight,
                                             norm_before_gate=False, backend="reference")
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("out", [3, 37, 700])
def test_decode_linear_is_the_linear_layer(out):
    """Without the norm, the kernel is the linear layer: x a column slice of a wider projection (Mamba-1's
    x_proj input), 3 to 700 outputs (one or two per program)."""
    packed = torch.randn(2, 700, device=DEVICE)
    x = packed[:, 50:350]
    linear = torch.nn.Linear(300, out, bias=False, device=DEVICE)
    with torch.no_grad():
        got = norm_linear.decode_linear(linear, x, backend="triton")
        want = (x.double() @ linear.weight.double().T)
    assert got.shape == (2, out) and rel_err(got, want) < 1e-5


def test_decode_linear_falls_back_to_the_module(monkeypatch):
    """A biased linear, more rows than MAX_FUSED_ROWS, or inputs needing gradients run the module itself."""
    calls = []
    fused = triton_decode.norm_linear
    monkeypatch.setattr(triton_decode, "norm_linear", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    plain = torch.nn.Linear(64, 8, bias=False, device=DEVICE)
    biased = torch.nn.Linear(64, 8, device=DEVICE)
    many = torch.randn(norm_linear.MAX_FUSED_ROWS + 1, 64, device=DEVICE)
    x = torch.randn(2, 64, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(norm_linear.decode_linear(biased, x, backend="triton"), biased(x))
        assert torch.equal(norm_linear.decode_linear(plain, many), plain(many))
    assert torch.equal(norm_linear.decode_linear(plain, x, backend="triton"), plain(x))  # weight needs grad
    assert calls == []
    with torch.no_grad():
        norm_linear.decode_linear(plain, x, backend="triton")
    assert calls == [2]


def test_default_path(monkeypatch):
    """Triton by default only for few rows without gradients: more rows, or inputs that need gradients,
    take the reference (the fused kernel has no backward)."""
    calls = []
    fused = triton_decode.norm_linear
    monkeypatch.setattr(triton_decode, "norm_linear", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    many = norm_linear.MAX_FUSED_ROWS + 1
    for rows in (1, many):
        x, norm_w, weight = make(rows, 64, 8, torch.float32)
        norm_linear.rms_norm_linear(x, norm_w, weight)
    expected = [1] if DEVICE == "cuda" else []  # the CPU default is the reference
    assert calls == expected
    x, norm_w, weight = make(1, 64, 8, torch.float32)
    weight.requires_grad_(True)
    out, _ = norm_linear.rms_norm_linear(x, norm_w, weight, backend="triton")
    out.sum().backward()
    assert calls == expected and weight.grad is not None and weight.grad.abs().sum() > 0


def test_bad_arguments():
    x, norm_w, weight = make(2, 64, 8, torch.float32)
    with pytest.raises(ValueError, match=r"x: expected shape \(rows, hidden\)"):
        norm_linear.rms_norm_linear(x[None], norm_w, weight)
    with pytest.raises(ValueError, match=r"weight: expected shape \(\*, 64\)"):
        norm_linear.rms_norm_linear(x, norm_w, weight[:, :32])
    with pytest.raises(TypeError, match="weight: expected x's dtype"):
        norm_linear.rms_norm_linear(x, norm_w, weight.double())
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 64\)"):
        norm_linear.rms_norm_linear(x, norm_w, weight, residual=x[:1])
    state = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"conv.offset: expected an int in \[0, 4\] \(4 conv channels of 8"):
        norm_linear.rms_norm_linear(x, norm_w, weight, conv=ConvStep(state, torch.ones(4, 3), offset=5))
    with pytest.raises(ValueError, match=r"conv.state: expected shape \(2, 4, 3\)"):
        norm_linear.rms_norm_linear(x, norm_w, weight, conv=ConvStep(state[:1], torch.ones(4, 3)))
    with pytest.raises(ValueError, match="conv.activation: expected one of"):
        norm_linear.rms_norm_linear(x, norm_w, weight, conv=ConvStep(state, torch.ones(4, 3), activation="relu"))
    with pytest.raises(ValueError, match="group_size: expected a divisor of hidden size 64, got 24"):
        norm_linear.rms_norm_gated_linear(x, x, norm_w, weight, group_size=24)

