"""Triton Mamba-1 kernels against independent float64 loops: the selective scan (forward, every gradient,
sequence-parallel chunks), run by the CPU interpreter at tiny shapes and on a GPU at real ones."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

scan_ops = importlib.import_module("mambakit.ops.selective_scan")  # the package; the function shadows it

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def vectorized_interpreter_scan():
    """The interpreter runs tl.associative_scan one element at a time in Python; run the same sequential
    combine over whole slices of the scanned axis instead (same order, same results, ~100x faster)."""
    try:
        from triton.runtime.interpreter import ScanOps
    except ImportError:
        yield
        return

    def generic_scan(self, inputs):
        data = [x.handle.data for x in inputs]
        outs = [np.empty_like(x) for x in data]
        index = [slice(None)] * data[0].ndim
        acc = None
        for i in range(data[0].shape[self.axis]):
            index[self.axis] = slice(i, i + 1)
            cur = [self.to_tensor(x[tuple(index)], inp.dtype) for x, inp in zip(data, inputs)]
            acc = cur if acc is None else list(self.combine_fn.fn(*acc, *cur))
            for o, a in zip(outs, acc):
                o[tuple(index)] = a.handle.data
        return [self.to_tensor(o, inp.dtype) for o, inp in zip(outs, inputs)]

    original = ScanOps.generic_scan
    ScanOps.generic_scan = generic_scan
    yield
    ScanOps.generic_scan = original


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def loop_scan(u, delta, A, B, C, D, z, delta_bias, softplus, h0, seq_idx):
    """float64 ground truth, one step at a time: returns out and the final state."""
    batch, dim, length = u.shape
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = F.softplus(delta)
    B = B.double() if B.dim() == 4 else B.double().unsqueeze(1)
    C = C.double() if C.dim() == 4 else C.double().unsqueeze(1)
    B = B.repeat_interleave(dim // B.shape[1], dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(dim // C.shape[1], dim=1)
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64, device=u.device) if h0 is None else h0.double()
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None]
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def make_inputs(batch, dim, length, N, groups=None, dtype=torch.float32, D=True, z=True, bias=True,
                h0=False, seq=False):
    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    bc_shape = (batch, N, length) if groups is None else (batch, groups, N, length)
    inputs = dict(
        u=rnd(batch, dim, length, dtype=dtype), delta=rnd(batch, dim, length, dtype=dtype, scale=0.5),
        A=-torch.rand(dim, N, device=DEVICE) * 2 - 0.1, B=rnd(*bc_shape, dtype=dtype), C=rnd(*bc_shape, dtype=dtype),
        D=rnd(dim) if D else None, z=rnd(batch, dim, length, dtype=dtype) if z else None,
        delta_bias=rnd(dim, scale=0.3) if bias else None, initial_state=rnd(batch, dim, N) if h0 else None,
    )
    seq_idx = None
    if seq:  # a few sequences per row, boundaries at random places
        seq_idx = torch.randint(0, 3, (batch, length), device=DEVICE).sort(dim=1).values.to(torch.int32)
    return inputs, seq_idx


def run_both(inputs, seq_idx, softplus, backward=True):
    """(ours, ground truth) for out, final state and the gradient of every float input."""
    leaves = {k: (v.clone().requires_grad_(backward) if v is not None else None) for k, v in inputs.items()}
    out, last = scan_ops.selective_scan(**leaves, delta_softplus=softplus, return_final_state=True,
                                        seq_idx=seq_idx, backend="triton")
    truth_leaves = {k: (v.detach().double().requires_grad_(backward) if v is not None else None)
                    for k, v in inputs.items()}
    t = truth_leaves
    ref_out, ref_last = loop_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                  softplus, t["initial_state"], seq_idx)
    ours, truth = {"out": out, "final_state": last}, {"out": ref_out, "final_state": ref_last}
    if backward:
        w_out, w_last = torch.randn_like(ref_out), torch.randn_like(ref_last)
        ((out.double() * w_out).sum() + (last.double() * w_last).sum()).backward()
        ((ref_out * w_out).sum() + (ref_last * w_last).sum()).backward()
        for k in inputs:
            if inputs[k] is not None:
                ours["d" + k], truth["d" + k] = leaves[k].grad, truth_leaves[k].grad
    return ours, truth


@pytest.fixture(autouse=True)
def short_tiles(monkeypatch):
    """On the CPU interpreter, 16-step tiles (several tiles and chunks at lengths it runs quickly) and
    4-channel backward programs (fewer programs to interpret); block sizes change speed, not results."""
    if DEVICE == "cpu":
        from mambakit.ops.selective_scan import triton_scan

        monkeypatch.setattr(triton_scan, "TILE_L", 16)
        monkeypatch.setattr(triton_scan, "BWD_BLOCK_D", 4)


SCAN_CASES = {
    # name: (batch, dim, length, N, groups, h0, seq_idx, chunks)
    "shared_BC": (2, 8, 40, 4, None, False, False, None),
    "grouped_h0_chunks": (1, 8, 60, 4, 2, True, False, 3),
    "seq_idx_h0_chunks": (2, 4, 50, 2, None, True, True, 2),
    "odd_groups_odd_N": (1, 6, 37, 3, 2, True, False, None),
}


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_matches_loop_fp32(case, monkeypatch):
    from mambakit.ops.selective_scan import triton_scan

    batch, dim, length, N, groups, h0, seq, chunks = SCAN_CASES[case]
    monkeypatch.setattr(triton_scan, "FORCE_CHUNKS", chunks)
    inputs, seq_idx = make_inputs(batch, dim, length, N, groups, h0=h0, seq=seq)
    ours, truth = run_both(inputs, seq_idx, softplus=True)
    assert ours["out"].dtype == inputs["u"].dtype and ours["final_state"].dtype == torch.float32
    for name, ref in truth.items():
        assert ours[name].shape == ref.shape, name
        assert rel_err(ours[name], ref) < 1e-4, (name, rel_err(ours[name], ref))


def test_scan_without_optional_inputs_strided_steps():
    inputs, _ = make_inputs(1, 4, 20, 4, D=False, z=False, bias=False)
    # delta as (batch, L, dim) transposed: steps not adjacent in memory, like linear(...).transpose(1, 2)
    inputs["delta"] = inputs["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    ours, truth = run_both(inputs, None, softplus=False)
    for name, ref in truth.items():
        assert rel_err(ours[name], ref) < 1e-4, name


@pytest.mark.parametrize("chunks", [None, 2])
@pytest.mark.parametrize("backward", [False, True])
def test_scan_reads_the_layer_layouts(chunks, backward, monkeypatch):
    """The Mamba layer's layouts: u, delta, z laid out (L, batch * L, 1) (cut from one matmul over all
    tokens), B and C views of x_proj's output with states adjacent; out comes in u's layout."""
    from mambakit.ops.selective_scan import triton_scan

    monkeypatch.setattr(triton_scan, "FORCE_CHUNKS", chunks)
    batch, dim, length, N = 2, 8, 40, 4
    inputs, _ = make_inputs(batch, dim, length, N, h0=True)
    tokens_major = lambda t: t.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # noqa: E731
    proj = torch.randn(batch, length, 3 + 2 * N, device=DEVICE)  # like x_proj's output: (dt, B, C) per step
    proj[..., 3:3 + N], proj[..., 3 + N:] = inputs["B"].transpose(1, 2), inputs["C"].transpose(1, 2)
    layer_inputs = dict(inputs, u=tokens_major(inputs["u"]), delta=tokens_major(inputs["delta"]),
                        z=tokens_major(inputs["z"]), B=proj[..., 3:3 + N].transpose(1, 2),
                        C=proj[..., 3 + N:].transpose(1, 2))
    if backward:  # (run_both clones the inputs: B and C become contiguous, as the op makes them for a backward)
        ours, truth = run_both(layer_inputs, None, softplus=True)
    else:
        with torch.no_grad():
            out, last = scan_ops.selective_scan(**layer_inputs, delta_softplus=True, return_final_state=True,
                                                backend="triton")
        ours = {"out": out, "final_state": last}
        truth = dict(zip(["out", "final_state"], loop_scan(
            inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
            inputs["delta_bias"], True, inputs["initial_state"], None)))
    assert ours["out"].stride() == layer_inputs["u"].stride()  # out_proj reads it with no copy
    for name, ref in truth.items():
        assert rel_err(ours[name], ref) < 1e-4, (name, rel_err(ours[name], ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_low_precision_inputs(dtype):
    inputs, _ = make_inputs(1, 4, 24, 4, dtype=dtype)
    ours, truth = run_both(inputs, None, softplus=True)
    assert ours["out"].dtype == dtype and ours["du"].dtype == dtype
    for name, ref in truth.items():
        assert rel_err(ours[name], ref) < 1e-2, name


def test_scan_matches_reference_op():
    """The public op's two backends agree (the reference is the package's definition of truth)."""
    inputs, seq_idx = make_inputs(1, 4, 33, 4, groups=2, h0=True, seq=True)
    kwargs = dict(delta_softplus=True, return_final_state=True, seq_idx=seq_idx)
    out, last = scan_ops.selective_scan(**inputs, **kwargs, backend="triton")
    ref_out, ref_last = scan_ops.selective_scan(**inputs, **kwargs, backend="reference")
    assert rel_err(out, ref_out) < 1e-5 and rel_err(last, ref_last) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [511, 4096])
def test_scan_gpu_real_shapes(dtype, length):
    inputs, seq_idx = make_inputs(2, 256, length, 16, dtype=dtype, h0=True)
    ours, truth = run_both(inputs, seq_idx, softplus=True)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for name, ref in truth.items():
        assert torch.isfinite(ours[name]).all(), name
        assert rel_err(ours[name], ref) < tol, (name, rel_err(ours[name], ref))


@pytest.mark.gpu
def test_scan_gpu_long_sequence_chunks_agree(monkeypatch):
    """1M steps in bf16: finite, and the sequence-parallel forward carries the state across chunks exactly."""
    from mambakit.ops.selective_scan import triton_scan

    inputs, _ = make_inputs(1, 64, 1 << 20, 16, dtype=torch.bfloat16)
    run = lambda: scan_ops.selective_scan(**inputs, delta_softplus=True, return_final_state=True, backend="triton")
    monkeypatch.setattr(triton_scan, "FORCE_CHUNKS", 1)
    out1, last1 = run()
    monkeypatch.setattr(triton_scan, "FORCE_CHUNKS", 64)
    out64, last64 = run()
    assert torch.isfinite(out1.float()).all() and torch.isfinite(last1).all()
    assert rel_err(out64, out1) < 1e-2 and rel_err(last64, last1) < 1e-5


# ---------------------------------------------------------------- causal conv1d
conv_ops = importlib.import_module("mambakit.ops.conv1d")


def loop_conv(x, weight, bias, seq_idx, initial_states, silu):
    """float64 ground truth: out and final states, position by position."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    hist = torch.zeros(batch, dim, width - 1, dtype=torch.float64, device=x.device)
    if initial_states is not None:
        hist = initial_states.double()
    full = torch.cat([hist, x.double()], dim=-1)
    owner = None
    if seq_idx is not None:
        owner = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)
    cols = []
    for t in range(length):
        acc = torch.zeros(batch, dim, dtype=torch.float64, device=x.device)
        for k in range(width):
            src = full[:, :, t + k]
            if owner is not None:
                src = src * (owner[:, t + k] == seq_idx[:, t]).double()[:, None]
            acc = acc + weight[:, k].double() * src
        if bias is not None:
            acc = acc + bias.double()
        cols.append(F.silu(acc) if silu else acc)
    final = full[:, :, length:]
    if owner is not None:
        final = final * (owner[:, length:] == seq_idx[:, -1:]).double()[:, None, :]
    return torch.stack(cols, dim=-1), final


@pytest.mark.parametrize("width,init,seq,silu", [(4, True, True, True), (4, False, False, False),
                                                 (3, True, False, True), (2, False, True, False)])
def test_conv_matches_loop(width, init, seq, silu):
    batch, dim, length = 2, 20, 150  # 20 channels, 150 steps: two blocks of each
    x = torch.randn(batch, dim, length, device=DEVICE)
    weight, bias = torch.randn(dim, width, device=DEVICE), torch.randn(dim, device=DEVICE)
    h0 = torch.randn(batch, dim, width - 1, device=DEVICE) if init else None
    seq_idx = torch.randint(0, 3, (batch, length), device=DEVICE).sort(dim=1).values.int() if seq else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias, h0)]
    out, final = conv_ops.causal_conv1d(leaves[0], leaves[1], leaves[2], seq_idx=seq_idx, initial_states=leaves[3],
                                        return_final_states=True, activation="silu" if silu else None,
                                        backend="triton")
    truth = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias, h0)]
    ref_out, ref_final = loop_conv(truth[0], truth[1], truth[2], seq_idx, truth[3], silu)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(final, ref_final) < 1e-6
    w_out, w_final = torch.randn_like(ref_out), torch.randn_like(ref_final)
    ((out.double() * w_out).sum() + (final.double() * w_final).sum()).backward()
    ((ref_out * w_out).sum() + (ref_final * w_final).sum()).backward()
    for ours, ref in zip(leaves, truth):
        if ours is not None:
            assert rel_err(ours.grad, ref.grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_gpu_real_shapes(dtype, channels_last):
    """Mamba-1's channels and length; channels_last: laid out as Mamba-2's slice of its in_proj output."""
    x = (torch.randn(4, 2047, 1536, device=DEVICE, dtype=dtype).transpose(1, 2) if channels_last
         else torch.randn(4, 1536, 2047, device=DEVICE, dtype=dtype))
    weight, bias = torch.randn(1536, 4, device=DEVICE, dtype=dtype), torch.randn(1536, device=DEVICE, dtype=dtype)
    seq_idx = torch.randint(0, 4, (4, 2047), device=DEVICE).sort(dim=1).values.int()
    args = dict(seq_idx=seq_idx, activation="silu")
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    refs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = conv_ops.causal_conv1d(*leaves, **args, backend="triton")
    ref = conv_ops.causal_conv1d(*refs, **args, backend="reference")
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol
    for a, b in zip(leaves, refs):
        assert torch.isfinite(a.grad).all() and rel_err(a.grad, b.grad) < (1e-4 if dtype == torch.float32 else 2e-2)


# ---------------------------------------------------------------- RMS norms
norm_ops = importlib.import_module("mambakit.ops.norm")


def rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("prenorm,with_residual", [(True, True), (False, True), (False, False)])
def test_rms_norm_matches_formula(prenorm, with_residual):
    x, w = torch.randn(3, 5, 72, device=DEVICE), torch.randn(72, device=DEVICE)
    res = torch.randn(3, 5, 72, device=DEVICE) if with_residual else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, res)]
    got = norm_ops.rms_norm(leaves[0], leaves[1], eps=1e-5, residual=leaves[2], prenorm=prenorm,
                            residual_in_fp32=True, backend="triton")
    truth = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, res)]
    s = truth[0] if res is None else truth[0] + truth[2]
    want = rms(s, 1e-5) * truth[1]
    outs, refs = (list(got), [want, s]) if prenorm else ([got], [want])
    loss, ref_loss = 0, 0
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and rel_err(o, r) < 1e-5
        weight = torch.randn_like(r)
        loss, ref_loss = loss + (o.double() * weight).sum(), ref_loss + (r * weight).sum()
    loss.backward()
    ref_loss.backward()
    for ours, ref in zip(leaves, truth):
        if ours is not None:
            assert rel_err(ours.grad, ref.grad) < 1e-5


@pytest.mark.parametrize("group_size,before", [(None, True), (24, True), (24, False), (None, False)])
def test_rms_norm_gated_matches_formula(group_size, before):
    x, z, w = torch.randn(4, 96, device=DEVICE), torch.randn(4, 96, device=DEVICE), torch.randn(96, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, z, w)]
    got = norm_ops.rms_norm_gated(leaves[0], leaves[2], z=leaves[1], group_size=group_size,
                                  norm_before_gate=before, backend="triton")
    tx, tz, tw = (t.detach().double().requires_grad_() for t in (x, z, w))
    gs = 96 if group_size is None else group_size
    inner = tx if before else tx * F.silu(tz)
    want = rms(inner.unflatten(-1, (-1, gs)), 1e-5).flatten(-2) * tw
    if before:
        want = want * F.silu(tz)
    assert rel_err(got, want) < 1e-5
    g = torch.randn_like(want)
    (got.double() * g).sum().backward()
    (want * g).sum().backward()
    for ours, ref in zip(leaves, (tx, tz, tw)):
        assert rel_err(ours.grad, ref.grad) < 1e-5


@pytest.mark.gpu
def test_norms_gpu_bf16():
    x, res = torch.randn(8, 2048, 768, device=DEVICE, dtype=torch.bfloat16), torch.randn(8, 2048, 768, device=DEVICE)
    w = torch.randn(768, device=DEVICE)
    ours = norm_ops.rms_norm(x, w, residual=res, prenorm=True, residual_in_fp32=True, backend="triton")
    ref = norm_ops.rms_norm(x, w, residual=res, prenorm=True, residual_in_fp32=True, backend="reference")
    assert torch.isfinite(ours[0].float()).all()
    assert rel_err(ours[0], ref[0]) < 1e-2 and rel_err(ours[1], ref[1]) < 1e-6
    z = torch.randn_like(x)
    gated = [norm_ops.rms_norm_gated(x, w, z=z, group_size=256, norm_before_gate=False, backend=b)
             for b in ("triton", "reference")]
    assert rel_err(gated[0], gated[1]) < 1e-2


# ---------------------------------------------------------------- decode steps
@pytest.mark.parametrize("groups", [None, 2])
def test_state_update_steps_match_loop(groups):
    """Decoding token by token with the kernel reproduces the float64 scan, outputs and final state."""
    inputs, _ = make_inputs(2, 40, 6, 5, groups=groups, h0=True)
    state = inputs["initial_state"].clone()
    outs = []
    for t in range(6):
        B, C = inputs["B"][..., t], inputs["C"][..., t]
        outs.append(scan_ops.selective_state_update(
            state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], B, C, D=inputs["D"],
            z=inputs["z"][..., t], dt_bias=inputs["delta_bias"], dt_softplus=True, backend="triton"))
    i = inputs
    ref_out, ref_last = loop_scan(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"], True,
                                  i["initial_state"], None)
    assert rel_err(torch.stack(outs, -1), ref_out) < 1e-5 and rel_err(state, ref_last) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_state_update_with_A_log_and_dt_proj_as_in_the_mamba_step(backend):
    """As in Mamba.step: dt (low rank), B, C are column slices of one x_proj output, dt_proj and
    A = -exp(A_log) are applied inside the step."""
    batch, dim, N, rank = 3, 40, 5, 7
    proj = torch.randn(batch, rank + 2 * N + 2, device=DEVICE)
    dt_low, B, C = proj[:, : rank + 2 * N].split([rank, N, N], dim=-1)
    x, z = torch.randn(batch, 2 * dim, device=DEVICE).chunk(2, dim=-1)  # strided halves
    weight, bias = torch.randn(dim, rank, device=DEVICE) * 0.3, torch.randn(dim, device=DEVICE)
    A_log, D = torch.randn(dim, N, device=DEVICE), torch.randn(dim, device=DEVICE)
    state = torch.randn(batch, dim, N, device=DEVICE)
    dt = (dt_low.double() @ weight.double().T)
    ref_out, ref_last = loop_scan(x[..., None], dt[..., None], -torch.exp(A_log.double()), B[..., None],
                                  C[..., None], D, z[..., None], bias, True, state, None)
    out = scan_ops.selective_state_update(state, x, dt_low, None, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True,
                                          A_log=A_log, dt_proj_weight=weight, backend=backend)
    assert rel_err(out, ref_out[..., 0]) < 1e-5 and rel_err(state, ref_last) < 1e-5
    with pytest.raises(ValueError, match="A, A_log"):
        scan_ops.selective_state_update(state, x, dt_low, -torch.exp(A_log), B, C, A_log=A_log, dt_proj_weight=weight)


@pytest.mark.parametrize("width,silu", [(4, True), (3, False)])
def test_conv_update_steps_match_loop(width, silu):
    x, w = torch.randn(2, 70, 5, device=DEVICE), torch.randn(70, width, device=DEVICE)
    b = torch.randn(70, device=DEVICE)
    h0 = torch.randn(2, 70, width - 1, device=DEVICE)
    state = torch.cat([torch.randn(2, 70, 1, device=DEVICE), h0], dim=-1)  # oldest column drops out first
    outs = [conv_ops.causal_conv1d_update(x[..., t], state, w, b, activation="silu" if silu else None,
                                          backend="triton") for t in range(5)]
    ref_out, ref_final = loop_conv(x, w, b, None, h0, silu)
    assert rel_err(torch.stack(outs, -1), ref_out) < 1e-5 and rel_err(state[..., 1:], ref_final) < 1e-6


# ---------------------------------------------------------------- torch.compile
def mamba1_like(x, conv_w, conv_b, delta, A, B, C, D, z, bias, norm_w, residual):
    """conv -> scan -> fused add + RMSNorm -> gated RMSNorm, through the public ops' Triton paths."""
    h = conv_ops.causal_conv1d(x, conv_w, conv_b, activation="silu", backend="triton")
    y = scan_ops.selective_scan(h, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, backend="triton")
    y = y.transpose(1, 2)
    normed, summed = norm_ops.rms_norm(y, norm_w, residual=residual, prenorm=True, residual_in_fp32=True,
                                       backend="triton")
    return norm_ops.rms_norm_gated(normed, norm_w, z=summed, group_size=4, backend="triton")


def test_compiled_matches_eager():
    """torch.compile traces the Triton ops (custom ops) without graph breaks, and the eager path (the same
    bodies through autograd.Functions) gives the same values and grads."""
    batch, dim, length, N = 1, 8, 20, 4
    inputs, _ = make_inputs(batch, dim, length, N)
    args = [torch.randn(batch, dim, length, device=DEVICE), torch.randn(dim, 4, device=DEVICE),
            torch.randn(dim, device=DEVICE), inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
            inputs["z"], inputs["delta_bias"], torch.randn(dim, device=DEVICE),
            torch.randn(batch, length, dim, device=DEVICE)]
    eager_args = [a.clone().requires_grad_() for a in args]
    compiled_args = [a.clone().requires_grad_() for a in args]
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # aot_eager: no C++ toolchain needed on the CPU
    compiled = torch.compile(mamba1_like, fullgraph=True, backend=backend)
    want, got = mamba1_like(*eager_args), compiled(*compiled_args)
    assert rel_err(got, want) < 1e-6
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    for a, b in zip(compiled_args, eager_args):
        assert rel_err(a.grad, b.grad) < 1e-6


def test_custom_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and autograd registrations agree with the real kernels."""
    from mambakit.ops.conv1d import triton_conv
    from mambakit.ops.norm import triton_norm
    from mambakit.ops.selective_scan import triton_scan

    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    inputs, _ = make_inputs(1, 4, 20, 4, groups=2)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    scan_args = (*(leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), True, None, None, True)
    torch.library.opcheck(triton_scan._scan_fwd_op, scan_args, test_utils=checks)
    x, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((1, 6, 30), (6, 4), (6,)))
    torch.library.opcheck(triton_conv._conv_fwd_op, (x, w, b, None, None, True), test_utils=checks)
    h, r, wn = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((3, 8), (3, 8), (8,)))
    norm_args = (h, r, None, wn, 1e-5, 8, False, True, torch.float32)
    torch.library.opcheck(triton_norm._norm_fwd_op, norm_args, test_utils=checks)
