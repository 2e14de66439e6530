"""Causal depthwise conv1d and its decode step against an independent float64 loop, on every path."""
import itertools
import os

import pytest
import torch

from mambakit.bench.common import rel_err
import mambakit.ops.conv1d as conv_module
from mambakit.ops import causal_conv1d, causal_conv1d_fn, causal_conv1d_update
from mambakit.ops._common import triton_available


def available(impls):
    """Paths to test on these CPU tensors: Triton only through its interpreter (test_triton_*.py runs it on a GPU)."""
    interpreted = triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
    return [name for name in impls if name != "triton" or interpreted]


BACKENDS = available(conv_module._IMPLS)
STEP_BACKENDS = available(conv_module._STEP_IMPLS)


def loop_conv(x, weight, bias=None, initial_states=None, seq_idx=None, activation=None):
    """Ground truth in float64: out[t] = sum over taps k of weight[k] * input[t - width + 1 + k].

    Inputs before position 0 come from initial_states (sequence of position 0); with seq_idx an input
    of another sequence than position t's counts as zero. Returns out and the final states.
    """
    x, weight = x.double(), weight.double()
    batch, dim, length = x.shape
    width = weight.shape[1]
    init = torch.zeros(batch, dim, width - 1, dtype=torch.float64) if initial_states is None else initial_states.double()
    seq = torch.zeros(batch, length, dtype=torch.long) if seq_idx is None else seq_idx.long()

    def input_at(s):
        return x[:, :, s] if s >= 0 else init[:, :, width - 1 + s]

    def seq_at(s):
        return seq[:, max(s, 0)]

    out = torch.zeros(batch, dim, length, dtype=torch.float64)
    for t in range(length):
        for k in range(width):
            s = t - width + 1 + k
            same = (seq_at(s) == seq[:, t]).double()[:, None]
            out[:, :, t] += weight[:, k] * input_at(s) * same
    if bias is not None:
        out += bias.double()[:, None]
    if activation is not None:
        out = out * torch.sigmoid(out)
    final = torch.stack([input_at(s) * (seq_at(s) == seq[:, -1]).double()[:, None]
                         for s in range(length - width + 1, length)], dim=-1)
    return out, final


VARIANTS = [(False, None, False), (True, "silu", False), (True, None, True), (False, "swish", True)]  # bias, act, init
ALL_CASES = list(itertools.product([1, 3, 7, 33], [2, 3, 4], VARIANTS))
# Triton runs in its slow CPU interpreter in CI: it gets a sample covering every length, width and variant.
SAMPLED_CASES = [(1, 4, VARIANTS[0]), (3, 2, VARIANTS[1]), (7, 3, VARIANTS[2]), (33, 4, VARIANTS[3])]


@pytest.mark.parametrize("backend,length,width,with_bias,activation,with_init", [
    (backend, length, width, *variant) for backend in BACKENDS
    for length, width, variant in (SAMPLED_CASES if backend == "triton" else ALL_CASES)])
def test_matches_float64_loop(backend, length, width, with_bias, activation, with_init):
    batch, dim = 2, 5
    x, weight = torch.randn(batch, dim, length), torch.randn(dim, width)
    bias = torch.randn(dim) if with_bias else None
    init = torch.randn(batch, dim, width - 1) if with_init else None
    out, final = causal_conv1d(x, weight, bias, initial_states=init, return_final_states=True,
                               activation=activation, backend=backend)
    ref, ref_final = loop_conv(x, weight, bias, init, activation=activation)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert final.shape == (batch, dim, width - 1)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(final.double(), ref_final)  # a copy of inputs: exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    x, weight, bias = torch.randn(2, 16, 50).bfloat16(), torch.randn(16, 4).bfloat16(), torch.randn(16).bfloat16()
    out = causal_conv1d(x, weight, bias, activation="silu", backend=backend)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, loop_conv(x, weight, bias, activation="silu")[0]) < 1e-2


def random_segments(length):
    seq = torch.zeros(length, dtype=torch.int32)
    if length == 1:
        return seq
    for cut in set(torch.randint(1, length, (3,)).tolist()) | {length - 1}:
        seq[cut:] += 1
    return seq


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 8, 30])
def test_seq_idx_equals_separate_sequences(backend, length):
    batch, dim, width = 2, 4, 4
    x, weight, bias = torch.randn(batch, dim, length), torch.randn(dim, width), torch.randn(dim)
    init = torch.randn(batch, dim, width - 1)
    seq_idx = torch.stack([random_segments(length), random_segments(length)])
    out, final = causal_conv1d(x, weight, bias, seq_idx=seq_idx, initial_states=init, return_final_states=True,
                               activation="silu", backend=backend)
    ref_full, ref_full_final = loop_conv(x, weight, bias, init, seq_idx, activation="silu")
    assert rel_err(out, ref_full) < 1e-5 and torch.equal(final.double(), ref_full_final)
    for row in range(batch):
        ids = seq_idx[row]
        for k, sid in enumerate(ids.unique()):
            cols = (ids == sid).nonzero().squeeze(1)
            start, stop = cols[0].item(), cols[-1].item() + 1
            # Initial states belong to the first sequence only; every later one starts from zeros.
            alone, alone_final = causal_conv1d(x[row:row + 1, :, start:stop], weight, bias,
                                               initial_states=init[row:row + 1] if k == 0 else None,
                                               return_final_states=True, activation="silu", backend=backend)
            assert rel_err(out[row:row + 1, :, start:stop], alone) < 1e-6
        assert torch.equal(final[row:row + 1], alone_final)


@pytest.mark.parametrize("backend, tiny_tiles, channels_last", [(backend, False, False) for backend in BACKENDS] + (
    [("triton", True, False), ("triton", True, True)] if "triton" in BACKENDS else []))
def test_gradients_match_float64_loop(backend, tiny_tiles, channels_last, monkeypatch):
    """tiny_tiles: Triton tiles of 2 channels x 4 steps, so that a sequence spans several programs in both
    directions (the real tiles exceed these test shapes)."""
    if tiny_tiles:
        from mambakit.ops.conv1d import triton_conv

        for name, value in dict(BLOCK_D=2, BLOCK_L=4, CHANNELS_LAST_BLOCK_D=2, CHANNELS_LAST_BLOCK_L=4).items():
            monkeypatch.setattr(triton_conv, name, value)
    batch, dim, length, width = 2, 3, 19 if tiny_tiles else 11, 4
    x = torch.randn(batch, length, dim).transpose(1, 2) if channels_last else torch.randn(batch, dim, length)
    leaves = dict(x=x, weight=torch.randn(dim, width), bias=torch.randn(dim),
                  initial_states=torch.randn(batch, dim, width - 1))
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    seq_idx = torch.stack([random_segments(length), torch.zeros(length, dtype=torch.int32)])
    out, final = causal_conv1d(**leaves, seq_idx=seq_idx, return_final_states=True, activation="silu", backend=backend)
    grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
    grads = torch.autograd.grad((out, final), list(leaves.values()), (grad_out, grad_final))
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref, ref_final = loop_conv(**leaves64, seq_idx=seq_idx, activation="silu")
    ref_grads = torch.autograd.grad((ref, ref_final), list(leaves64.values()), (grad_out.double(), grad_final.double()))
    for name, g, ref_g in zip(leaves, grads, ref_grads):
        assert rel_err(g, ref_g) < 1e-5, name


def test_gradcheck_reference():
    batch, dim, length, width = 1, 2, 5, 3
    tensors = [torch.randn(batch, dim, length), torch.randn(dim, width), torch.randn(dim),
               torch.randn(batch, dim, width - 1)]
    tensors = [t.double().requires_grad_() for t in tensors]
    seq_idx = torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.int32)

    def fn(x, weight, bias, init):
        return causal_conv1d(x, weight, bias, seq_idx=seq_idx, initial_states=init, return_final_states=True,
                             activation="silu", backend="reference")

    assert torch.autograd.gradcheck(fn, tensors)


def test_official_alias():
    x, weight = torch.randn(2, 3, 6), torch.randn(3, 4)
    out = causal_conv1d_fn(x, weight, activation="silu")
    assert rel_err(out, loop_conv(x, weight, activation="silu")[0]) < 1e-5


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("width", [2, 4])
def test_update_token_by_token_equals_parallel_and_continues_its_state(backend, width):
    batch, dim, length, prefix = 2, 6, 10, 3
    x, weight, bias = torch.randn(batch, dim, length), torch.randn(dim, width), torch.randn(dim)
    full = causal_conv1d(x, weight, bias, activation="silu", backend="reference")
    _, head_final = causal_conv1d(x[..., :prefix], weight, bias, return_final_states=True, backend="reference")
    # The oldest column is shifted out by the next update, so its content must not matter.
    conv_state = torch.cat([torch.randn(batch, dim, 1), head_final], dim=-1)
    steps = [causal_conv1d_update(x[..., t], conv_state, weight, bias, activation="silu", backend=backend)
             for t in range(prefix, length)]
    assert rel_err(torch.stack(steps, dim=-1), full[..., prefix:]) < 1e-5
    _, final = causal_conv1d(x, weight, bias, return_final_states=True, backend="reference")
    assert torch.equal(conv_state[..., 1:], final)
    assert torch.equal(conv_state[..., -1], x[..., -1])


def test_bad_inputs_name_the_argument():
    x, weight = torch.randn(2, 4, 6), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight: expected shape \(4, \*\), got \(5, 3\)"):
        causal_conv1d(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="bias: expected shape"):
        causal_conv1d(x, weight, torch.randn(3))
    with pytest.raises(ValueError, match=r"initial_states: expected shape \(2, 4, 2\)"):
        causal_conv1d(x, weight, initial_states=torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="seq_idx: expected dtype"):
        causal_conv1d(x, weight, seq_idx=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="seq_idx: expected shape"):
        causal_conv1d(x, weight, seq_idx=torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected dtype"):
        causal_conv1d(x.long(), weight)
    with pytest.raises(ValueError, match="activation: expected one of"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, weight, backend="fast")
    with pytest.raises(ValueError, match=r"conv_state: expected shape \(2, 4, 3\)"):
        causal_conv1d_update(x[..., 0], torch.zeros(2, 4, 2), weight)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update(x[..., 0], torch.zeros(2, 4, 3), weight, activation="gelu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    """Layers pass x as a transposed view of a (batch, L, dim) projection."""
    x, weight, bias = torch.randn(2, 11, 6).transpose(1, 2), torch.randn(6, 4), torch.randn(6)
    out = causal_conv1d(x, weight, bias, activation="silu", backend=backend)
    assert rel_err(out, loop_conv(x, weight, bias, activation="silu")[0]) < 1e-5


def _stride_order(t):
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("layout", ["channels_last", "dim_batch_steps"])
def test_triton_keeps_the_input_layout(layout):
    """Output and input gradient laid out as x is: Mamba2's channels-last slice of its projection (x, B, C
    then read as row views) and Mamba's (dim, batch, L) projection output (x_proj then reads the conv's
    output with no copy); values match the contiguous input's."""
    if layout == "channels_last":
        x = torch.randn(2, 13, 9)[..., 1:7].transpose(1, 2)  # (2, 6, 13), unit stride along dim
    else:
        x = torch.randn(12, 2, 13)[:6].permute(1, 0, 2)  # (2, 6, 13), the first half of Mamba's xz
    x.requires_grad_(True)
    dense = x.detach().contiguous().requires_grad_(True)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    out, ref = (causal_conv1d(t, weight, bias, activation="silu", backend="triton") for t in (x, dense))
    assert _stride_order(out) == _stride_order(x) != _stride_order(ref) and ref.is_contiguous()
    assert rel_err(out, ref) < 1e-6
    grad = torch.randn(2, 13, 6).transpose(1, 2)
    (dx,), (dref,) = (torch.autograd.grad(o, t, grad) for o, t in ((out, x), (ref, dense)))
    assert _stride_order(dx) == _stride_order(x)
    assert rel_err(dx, dref) < 1e-6
