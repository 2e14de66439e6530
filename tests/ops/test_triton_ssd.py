"""Fused Triton SSD (forward, backward, varlen states, decode step, custom op) against an
independent float64 loop over time. On the CPU these run in the Triton interpreter at tiny shapes."""
import pytest
import torch
import torch.nn.functional as F

from mambakit.ops._common import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def loop_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=False, dt_limit=None, h0=None, seq_idx=None):
    """float64 recurrence, one step at a time: returns out (b, L, h, p) and the state after every step.

    A is (h,) or, to expose each step's share of A's gradient, (b, L, h)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, length, nheads, headdim = x.shape
    group = torch.arange(nheads) // (nheads // B.shape[2])
    dt = dt + dt_bias.double() if dt_bias is not None else dt
    dt = F.softplus(dt) if softplus else dt
    dt = dt.clamp(*dt_limit) if dt_limit is not None else dt
    h = h0.double() if h0 is not None else x.new_zeros(batch, nheads, headdim, B.shape[3])
    outs, states = [], []
    for t in range(length):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        a = A[:, t] if A.dim() == 3 else A
        h = torch.exp(dt[:, t] * a)[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group, None, :]
        y = (h * C[:, t, group, None, :]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D.double()[:, None] if D.dim() == 1 else D.double())
        if z is not None:
            y = y * F.silu(z[:, t].double())
        outs.append(y)
        states.append(h)
    return torch.stack(outs, 1), torch.stack(states, 1)


def make(batch, length, nheads, headdim, ngroups, N, dtype=torch.float32, *, D="head", z=True, bias=True,
         init=True, seq=False, softplus=True, dt_scale=1.0):
    """Fresh random inputs in a Mamba-2 layer's ranges, all requiring grad."""
    kw = dict(device=DEVICE)
    t = dict(
        x=torch.randn(batch, length, nheads, headdim, **kw).to(dtype),
        dt=(torch.randn(batch, length, nheads, **kw) * dt_scale).to(dtype),
        A=-(torch.rand(nheads, **kw) * 1.9 + 0.1),
        B=torch.randn(batch, length, ngroups, N, **kw).to(dtype),
        C=torch.randn(batch, length, ngroups, N, **kw).to(dtype),
    )
    if D == "head":
        t["D"] = torch.randn(nheads, **kw)
    elif D == "channel":
        t["D"] = torch.randn(nheads, headdim, **kw)
    if z:
        t["z"] = torch.randn(batch, length, nheads, headdim, **kw).to(dtype)
    if bias:
        t["dt_bias"] = torch.randn(nheads, **kw) * 0.5
    if init:
        t["initial_states"] = torch.randn(batch, nheads, headdim, N, **kw)
    for v in t.values():
        v.requires_grad_(True)
    if seq:  # many short sequences: a new one starts with probability 1/4 at each step
        starts = (torch.rand(batch, length, **kw) < 0.25).int()
        starts[:, 0] = 0
        t["seq_idx"] = starts.cumsum(1).int()
    return t


def run_triton(inputs, chunk_size, softplus=True, dt_limit=(0.0, float("inf"))):
    from mambakit.ops.ssd import triton_ssd

    return triton_ssd.ssd(**inputs, chunk_size=chunk_size, dt_softplus=softplus, dt_limit=dt_limit,
                          return_final_states=True)


def check_against_loop(inputs, chunk_size, tol, softplus=True, dt_limit=None, grad_tol=None):
    """Outputs and every gradient against loop_ssd in float64.

    A's and dt_bias's gradients are sums over (batch, time) of terms that can nearly cancel, so their
    error is measured against the norm of the summed |terms| (the scale fp32 rounding works at)."""
    out, final = run_triton(inputs, chunk_size, softplus, dt_limit or (0.0, float("inf")))
    ref_inputs = {k: v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v
                  for k, v in inputs.items()}
    batch, length = inputs["x"].shape[:2]
    A_steps = ref_inputs["A"].detach()[None, None].expand(batch, length, -1).clone().requires_grad_(True)
    names = {"initial_states": "h0"}
    ref_out, ref_states = loop_ssd(**{names.get(k, k): v for k, v in ref_inputs.items() if k != "A"}, A=A_steps,
                                   softplus=softplus, dt_limit=dt_limit)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert rel_err(out, ref_out) < tol
    assert rel_err(final, ref_states[:, -1]) < tol
    g_out, g_final = torch.randn_like(ref_out), torch.randn_like(ref_states[:, -1])
    ((out.double() * g_out).sum() + (final.double() * g_final).sum()).backward()
    ((ref_out * g_out).sum() + (ref_states[:, -1] * g_final).sum()).backward()
    ref_inputs["A"].grad = A_steps.grad.sum((0, 1))
    summed_terms = {"A": A_steps.grad, "dt_bias": ref_inputs["dt"].grad}  # dt_bias enters as dt + dt_bias
    for name, v in inputs.items():
        if v.is_floating_point():
            assert v.grad is not None and torch.isfinite(v.grad).all(), name
            ref = ref_inputs[name].grad
            scale = summed_terms[name].abs().sum((0, 1)).norm() if name in summed_terms else ref.norm()
            err = ((v.grad.double() - ref).norm() / scale).item()
            assert err < (grad_tol or {}).get(name, tol), (name, err)


@pytest.mark.parametrize("case", ["groups+init+z", "seq_idx+channel_D+limit", "multi_block"])
def test_forward_backward_fp32(case, monkeypatch):
    from mambakit.ops.ssd import triton_ssd

    if case == "groups+init+z":  # L not a multiple of the chunk, two groups, every option
        check_against_loop(make(2, 45, 4, 5, 2, 7), chunk_size=16, tol=1e-4)
    elif case == "seq_idx+channel_D+limit":  # many short sequences crossing chunk edges, clamped dt
        check_against_loop(make(2, 40, 2, 4, 1, 6, D="channel", seq=True), chunk_size=16, tol=1e-4,
                           dt_limit=(0.1, 1.5))
    else:  # several row blocks per chunk (16 rows, chunk 64), no gate, no softplus, no initial state
        monkeypatch.setattr(triton_ssd, "BLOCK_T", 16)
        inputs = make(1, 70, 2, 3, 1, 4, z=False, bias=False, init=False)
        inputs["dt"] = (torch.rand_like(inputs["dt"]) * 0.5 + 0.01).requires_grad_(True)
        check_against_loop(inputs, chunk_size=64, tol=1e-4, softplus=False)


def test_large_decay_is_finite_and_exact():
    """|A dt| up to ~100 per step: every decay underflows to 0 rather than overflowing.

    A chunk's decay cumsum reaches ~-1600 here, where an fp32 ulp is ~1e-4, so each step's share of
    dA carries ~1e-4 relative error (up to 1.1e-3 against the summed |terms| in 200 seeds), far beyond
    the |A dt| < 2 of trained models."""
    inputs = make(1, 40, 2, 4, 1, 4, dt_scale=30.0, init=True)
    check_against_loop(inputs, chunk_size=16, tol=1e-4, grad_tol={"A": 3e-3})


def test_varlen_states():
    from mambakit.ops.ssd import triton_ssd
    from mambakit.ops.ssd import seq_idx_from_cu_seqlens

    cu = torch.tensor([0, 5, 6, 23, 40, 41], device=DEVICE, dtype=torch.int32)
    inputs = make(1, 41, 2, 4, 1, 6, z=False, D=None)
    with torch.no_grad():
        seq_idx = seq_idx_from_cu_seqlens(cu, 41)
        out, varlen = triton_ssd.ssd(**inputs, chunk_size=16, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu,
                                     return_varlen_states=True)
    _, states = loop_ssd(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"],
                         dt_bias=inputs["dt_bias"], softplus=True, h0=inputs["initial_states"], seq_idx=seq_idx)
    assert rel_err(varlen, states[0, cu[1:].long() - 1]) < 1e-4


def packed_views(batch, length, nheads, headdim, ngroups, N):
    """x, B, C, dt as Mamba2 passes them: column slices of one (batch, L, width) buffer, rows not dense."""
    widths = [nheads * headdim, ngroups * N, ngroups * N, nheads]
    packed = torch.randn(batch, length, sum(widths) + 3, device=DEVICE)
    x, B, C, dt = packed[..., : sum(widths)].split(widths, dim=-1)
    return x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, N)), C.unflatten(-1, (ngroups, N)), dt


def test_forward_reads_strided_views_in_place():
    """The forward kernels read x, B, C, dt with their batch and step strides: the same outputs as
    contiguous copies, gradients too (the backward copies), and varlen states alike."""
    from mambakit.ops.ssd import seq_idx_from_cu_seqlens, triton_ssd

    x, B, C, dt = (t.requires_grad_(True) for t in packed_views(2, 37, 4, 5, 2, 6))
    others = dict(A=-(torch.rand(4, device=DEVICE) + 0.1), D=torch.randn(4, device=DEVICE),
                  dt_bias=torch.randn(4, device=DEVICE) * 0.5)
    strided = dict(x=x, dt=dt, B=B, C=C)
    dense = {k: v.detach().contiguous().requires_grad_(True) for k, v in strided.items()}
    outs = [triton_ssd.ssd(**inputs, **others, chunk_size=16, dt_softplus=True, return_final_states=True)
            for inputs in (strided, dense)]
    for got, want in zip(*outs):
        assert rel_err(got, want) < 1e-6
    grad = torch.randn_like(outs[1][0])
    for (out, _), inputs in zip(outs, (strided, dense)):
        out.backward(grad)
    for name in strided:
        assert rel_err(strided[name].grad, dense[name].grad) < 1e-6, name

    cu = torch.tensor([0, 9, 30, 37], device=DEVICE, dtype=torch.int32)
    with torch.no_grad():
        x, B, C, dt = packed_views(1, 37, 4, 5, 2, 6)
        states = [triton_ssd.ssd(**inputs, **others, chunk_size=16, dt_softplus=True,
                                 seq_idx=seq_idx_from_cu_seqlens(cu, 37), cu_seqlens=cu, return_varlen_states=True)[1]
                  for inputs in (dict(x=x, dt=dt, B=B, C=C), dict(x=x.contiguous(), dt=dt.contiguous(),
                                                                  B=B.contiguous(), C=C.contiguous()))]
    assert rel_err(states[0], states[1]) < 1e-6


def test_step_matches_loop():
    from mambakit.ops.ssd import triton_step

    batch, nheads, headdim, ngroups, N = 3, 4, 5, 2, 6
    state = torch.randn(batch, nheads, headdim, N, device=DEVICE)
    steps = 3
    xs = torch.randn(batch, steps, nheads, headdim, device=DEVICE)
    dts = torch.randn(batch, steps, nheads, device=DEVICE)
    A = -(torch.rand(nheads, device=DEVICE) + 0.1)
    Bs, Cs = (torch.randn(batch, steps, ngroups, N, device=DEVICE) for _ in range(2))
    zs = torch.randn(batch, steps, nheads, headdim, device=DEVICE)
    D, bias = torch.randn(nheads, headdim, device=DEVICE), torch.randn(nheads, device=DEVICE)
    ref_out, ref_states = loop_ssd(xs, dts, A, Bs, Cs, D=D, z=zs, dt_bias=bias, softplus=True, h0=state,
                                   dt_limit=(0.0, 2.0))
    outs = [triton_step.ssd_state_update(state, xs[:, t], dts[:, t], A, Bs[:, t], Cs[:, t], D=D, z=zs[:, t],
                                         dt_bias=bias, dt_softplus=True, dt_limit=(0.0, 2.0)) for t in range(steps)]
    assert rel_err(torch.stack(outs, 1), ref_out) < 1e-5
    assert rel_err(state, ref_states[:, -1]) < 1e-5


def test_step_reads_strided_views_and_A_log_in_place():
    """As in Mamba2.step: x, dt, B, C are column slices of one in_proj output, A comes as A_log."""
    from mambakit.ops.ssd import triton_step

    batch, nheads, headdim, ngroups, N = 3, 4, 5, 2, 6
    widths = [nheads * headdim, ngroups * N, ngroups * N, nheads]
    packed = torch.randn(batch, sum(widths) + 3, device=DEVICE)  # 3 spare columns: rows are not dense
    x, B, C, dt = packed[:, : sum(widths)].split(widths, dim=-1)
    x, B, C = x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, N)), C.unflatten(-1, (ngroups, N))
    A_log = torch.randn(nheads, device=DEVICE)
    bias, D = torch.randn(nheads, device=DEVICE), torch.randn(nheads, device=DEVICE)
    state = torch.randn(batch, nheads, headdim, N, device=DEVICE)
    ref_out, ref_states = loop_ssd(x[:, None], dt[:, None], -torch.exp(A_log), B[:, None], C[:, None], D=D,
                                   dt_bias=bias, softplus=True, h0=state)
    out = triton_step.ssd_state_update(state, x, dt, None, B, C, D=D, dt_bias=bias, dt_softplus=True, A_log=A_log)
    assert out.is_contiguous() and rel_err(out, ref_out[:, 0]) < 1e-5
    assert rel_err(state, ref_states[:, -1]) < 1e-5


def test_custom_op_compiles_and_matches_eager():
    """torch.compile traces the registered ops (fake tensors); eager calls run the same bodies through an
    autograd.Function: both give the same output and the same gradient for every input."""
    from mambakit.ops.ssd import triton_ssd

    inputs = make(1, 20, 2, 4, 1, 4, init=False)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")

    def f(x, dt, A, B, C, D, z, dt_bias):
        return triton_ssd.ssd(x, dt, A, B, C, 16, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)

    eager_args = [inputs[k].detach().clone().requires_grad_() for k in names]
    compiled_args = [inputs[k].detach().clone().requires_grad_() for k in names]
    eager = f(*eager_args)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*compiled_args)
    assert torch.equal(eager, compiled)
    grad = torch.randn_like(eager)
    eager.backward(grad)
    compiled.backward(grad)
    for name, a, b in zip(names, eager_args, compiled_args):
        assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0, name
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,length", [(torch.float32, 1000), (torch.bfloat16, 4096)])
def test_gpu_matches_reference(dtype, length):
    """Real shapes on the GPU against the reference in float64, gradients included (the CPU
    interpreter cannot catch a GPU miscompile); 1000 steps: many sequences, last chunk partial."""
    from mambakit.ops.ssd import reference

    inputs = make(2, length, 8, 64, 2, 128, dtype=dtype, seq=length == 1000)
    out, final = run_triton(inputs, 256)
    ref_in = {k: v.detach().double().requires_grad_(True) if v.is_floating_point() else v for k, v in inputs.items()}
    ref_out, ref_final = reference.ssd(**ref_in, chunk_size=64, dt_softplus=True, return_final_states=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref_out) < tol and rel_err(final, ref_final) < tol
    g = torch.randn_like(ref_out)
    (out.double() * g).sum().backward()
    (ref_out * g).sum().backward()
    for name, v in inputs.items():
        if v.is_floating_point():
            assert rel_err(v.grad, ref_in[name].grad) < tol, name


@pytest.mark.gpu
def test_gpu_one_million_tokens_finite():
    inputs = make(1, 1 << 20, 8, 64, 1, 128, dtype=torch.bfloat16, init=False)
    out, final = run_triton(inputs, 256)
    (out.float().square().mean() + final.square().mean()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(v.grad).all() for v in inputs.values() if v.is_floating_point())
