"""Selective scan and its decode step against an independent float64 loop over time, on every path."""
import importlib
import itertools
import os

import pytest
import torch

from mambakit.ops import selective_scan, selective_scan_fn, selective_state_update
from mambakit.ops._common import triton_available


def available(impls):
    """Paths to test on these CPU tensors: Triton only through its interpreter (test_triton_*.py runs it on a GPU)."""
    interpreted = triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
    return [name for name in impls if name != "triton" or interpreted]


# The package attribute `mambakit.ops.selective_scan` is the function; import_module gives the package.
scan_module = importlib.import_module("mambakit.ops.selective_scan")
BACKENDS = available(scan_module._IMPLS)
STEP_BACKENDS = available(scan_module._STEP_IMPLS)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None, seq_idx=None):
    """Ground truth in float64: one time step at a time, each channel reading its group's B and C."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    B = B if B.dim() == 4 else B.unsqueeze(1)
    C = C if C.dim() == 4 else C.unsqueeze(1)
    group_b = torch.arange(dim) // (dim // B.shape[1])
    group_c = torch.arange(dim) // (dim // C.shape[1])
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).double()
            h = h * same[:, None, None]
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, group_b, :, t]
        y = (h * C[:, group_c, :, t]).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, :, t]
        if z is not None:
            zt = z[:, :, t].double()
            y = y * zt / (1 + torch.exp(-zt))
        ys.append(y)
    return torch.stack(ys, dim=-1), h


def make_inputs(batch, dim, state_size, length, groups_b, groups_c, dtype=torch.float32, softplus=False):
    """Random inputs in the ranges a Mamba layer sees: negative A, positive step sizes."""
    def group_shape(groups):
        return (batch, state_size, length) if groups is None else (batch, groups, state_size, length)

    delta = torch.randn(batch, dim, length) if softplus else torch.rand(batch, dim, length) * 0.5 + 0.01
    return dict(
        u=torch.randn(batch, dim, length).to(dtype),
        delta=delta.to(dtype),
        A=-torch.exp(torch.randn(dim, state_size) * 0.5),
        B=torch.randn(group_shape(groups_b)).to(dtype),
        C=torch.randn(group_shape(groups_c)).to(dtype),
    )


def make_options(batch, dim, state_size, length, dtype, names):
    options = dict(
        D=torch.randn(dim),
        z=torch.randn(batch, dim, length).to(dtype),
        delta_bias=torch.rand(dim) * 0.5,  # positive: without softplus, delta must stay > 0 or the state grows
        initial_state=torch.randn(batch, dim, state_size),
    )
    return {k: v for k, v in options.items() if k in names}


SHAPES = [  # batch, dim, N, L, groups of B (None = shared), groups of C
    (1, 4, 3, 1, None, None),
    (2, 6, 4, 7, 3, None),
    (2, 8, 16, 33, 2, 4),
]
OPTIONS = [(), ("D",), ("D", "z", "delta_bias"), ("z", "initial_state"), ("D", "z", "delta_bias", "initial_state")]
ALL_CASES = list(itertools.product(SHAPES, OPTIONS, [False, True]))
# Triton runs in its slow CPU interpreter in CI: it gets a sample covering every shape and option.
SAMPLED_CASES = [
    (SHAPES[0], OPTIONS[0], False),
    (SHAPES[1], OPTIONS[4], True),
    ((1, 8, 16, 33, 2, 4), OPTIONS[2], True),
    ((1, 8, 16, 33, 2, 4), OPTIONS[3], False),
]


def case_params():
    for backend in BACKENDS:
        for shape, names, softplus in SAMPLED_CASES if backend == "triton" else ALL_CASES:
            case_id = f"{backend}-{shape}-{'+'.join(names) or 'plain'}-{'softplus' if softplus else 'linear'}"
            yield pytest.param(backend, shape, names, softplus, id=case_id)


@pytest.mark.parametrize("backend,shape,names,softplus", list(case_params()))
def test_matches_float64_loop(backend, shape, names, softplus):
    batch, dim, n, length, gb, gc = shape
    inputs = make_inputs(batch, dim, n, length, gb, gc, softplus=softplus)
    options = make_options(batch, dim, n, length, torch.float32, names)
    out, final = selective_scan(**inputs, **options, delta_softplus=softplus, return_final_state=True, backend=backend)
    ref, ref_final = loop_scan(**inputs, D=options.get("D"), z=options.get("z"), delta_bias=options.get("delta_bias"),
                               delta_softplus=softplus, h0=options.get("initial_state"))
    assert out.dtype == torch.float32 and out.shape == (batch, dim, length)
    assert final.dtype == torch.float32 and final.shape == (batch, dim, n)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(final, ref_final) < 1e-5


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in BACKENDS
                                           for d in ([torch.bfloat16] if b == "triton" else [torch.bfloat16, torch.float16])])
def test_half_precision_inputs(backend, dtype):
    inputs = make_inputs(1, 8, 16, 48, 2, 2, dtype=dtype, softplus=True)
    options = make_options(1, 8, 16, 48, dtype, ("D", "z", "delta_bias"))
    out, final = selective_scan(**inputs, **options, delta_softplus=True, return_final_state=True, backend=backend)
    ref, ref_final = loop_scan(**inputs, D=options["D"], z=options["z"], delta_bias=options["delta_bias"],
                               delta_softplus=True)
    assert out.dtype == dtype and final.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2 and rel_err(final, ref_final) < 1e-2


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "triton"])  # interpreter: too long
def test_long_half_precision_sequence_stays_finite(backend):
    """fp16 activations over thousands of steps: the fp32 state neither overflows nor drifts."""
    inputs = make_inputs(1, 4, 8, 3000, None, None, dtype=torch.float16, softplus=True)
    options = make_options(1, 4, 8, 3000, torch.float16, ("D", "z", "delta_bias"))
    out, final = selective_scan(**inputs, **options, delta_softplus=True, return_final_state=True, backend=backend)
    ref, ref_final = loop_scan(**inputs, D=options["D"], z=options["z"], delta_bias=options["delta_bias"],
                               delta_softplus=True)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert rel_err(out, ref) < 1e-2 and rel_err(final, ref_final) < 1e-4


def random_segments(length):
    """seq_idx (length,) int32 with random cut points, including a length-1 sequence when possible."""
    seq = torch.zeros(length, dtype=torch.int32)
    if length == 1:
        return seq
    cuts = set(torch.randint(1, length, (3,)).tolist()) | {length - 1}
    for cut in cuts:
        seq[cut:] += 1
    return seq


@pytest.mark.parametrize("backend,length", [(b, n) for b in BACKENDS for n in ([9] if b == "triton" else [1, 9, 40])])
def test_seq_idx_equals_separate_sequences(backend, length):
    batch, dim, n = 2, 6, 4
    inputs = make_inputs(batch, dim, n, length, 3, None, softplus=True)
    options = make_options(batch, dim, n, length, torch.float32, ("D", "z", "delta_bias", "initial_state"))
    seq_idx = torch.stack([random_segments(length), random_segments(length)])
    out, final = selective_scan(**inputs, **options, delta_softplus=True, seq_idx=seq_idx, return_final_state=True,
                                backend=backend)
    for row in range(batch):
        ids = seq_idx[row]
        for k, sid in enumerate(ids.unique()):
            cols = (ids == sid).nonzero().squeeze(1)
            start, stop = cols[0].item(), cols[-1].item() + 1
            alone = {key: (t[row:row + 1, ..., start:stop] if key in ("u", "delta", "B", "C", "z") else t)
                     for key, t in {**inputs, **options}.items()}
            # The initial state belongs to the first sequence only.
            alone["h0"] = options["initial_state"][row:row + 1] if k == 0 else None
            del alone["initial_state"]
            ref, ref_final = loop_scan(**alone, delta_softplus=True)
            assert rel_err(out[row:row + 1, :, start:stop], ref) < 1e-5
        assert rel_err(final[row:row + 1], ref_final) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_loop(backend):
    batch, dim, n, length = 2, 4, 3, 13
    inputs = make_inputs(batch, dim, n, length, 2, None, softplus=True)
    options = make_options(batch, dim, n, length, torch.float32, ("D", "z", "delta_bias", "initial_state"))
    seq_idx = torch.stack([random_segments(length), torch.zeros(length, dtype=torch.int32)])
    leaves = {k: v.clone().requires_grad_() for k, v in {**inputs, **options}.items()}
    out, final = selective_scan(**leaves, delta_softplus=True, seq_idx=seq_idx, return_final_state=True, backend=backend)
    grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
    grads = torch.autograd.grad((out, final), list(leaves.values()), (grad_out, grad_final))

    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    args = dict(leaves64)
    args["h0"] = args.pop("initial_state")
    ref, ref_final = loop_scan(**args, delta_softplus=True, seq_idx=seq_idx)
    ref_grads = torch.autograd.grad((ref, ref_final), list(leaves64.values()), (grad_out.double(), grad_final.double()))
    for name, g, ref_g in zip(leaves, grads, ref_grads):
        assert rel_err(g, ref_g) < 1e-4, name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_paths_with_and_without_gradients_agree(shape):
    """The CPU scan runs a different loop when no gradient is needed (states N-major, never stored)."""
    batch, dim, n, length, gb, gc = shape
    inputs = make_inputs(batch, dim, n, length, gb, gc, softplus=True)
    options = make_options(batch, dim, n, length, torch.float32, ("D", "z", "delta_bias", "initial_state"))
    seq_idx = torch.stack([random_segments(length)] * batch)
    kwargs = dict(delta_softplus=True, seq_idx=seq_idx, return_final_state=True, backend="cpu")
    with torch.no_grad():
        out, final = selective_scan(**inputs, **options, **kwargs)
    leaves = {k: v.clone().requires_grad_() for k, v in {**inputs, **options}.items()}
    out_grad, final_grad = selective_scan(**leaves, **kwargs)
    assert out_grad.requires_grad
    assert rel_err(out, out_grad) < 1e-5 and rel_err(final, final_grad) < 1e-5


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name in ("reference", "cpu")])
def test_gradcheck_all_inputs(backend):
    batch, dim, n, length = 1, 4, 2, 5
    inputs = make_inputs(batch, dim, n, length, 2, None, softplus=True)
    options = make_options(batch, dim, n, length, torch.float32, ("D", "z", "delta_bias", "initial_state"))
    names = list({**inputs, **options})
    values = [t.double().requires_grad_() for t in {**inputs, **options}.values()]
    seq_idx = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.int32)

    def fn(*tensors):
        return selective_scan(**dict(zip(names, tensors)), delta_softplus=True, seq_idx=seq_idx,
                              return_final_state=True, backend=backend)

    assert torch.autograd.gradcheck(fn, values)


def test_official_alias():
    inputs = make_inputs(2, 4, 3, 6, None, None)
    D, z = torch.randn(4), torch.randn(2, 4, 6)
    out, last = selective_scan_fn(**inputs, D=D, z=z, return_last_state=True)
    ref, ref_last = loop_scan(**inputs, D=D, z=z)
    assert rel_err(out, ref) < 1e-5 and rel_err(last, ref_last) < 1e-5
    assert isinstance(selective_scan_fn(**inputs), torch.Tensor)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("groups", [(None, None), (2, 4)], ids=str)
def test_step_by_step_equals_parallel_and_continues_its_state(backend, groups):
    batch, dim, n, length, prefix = 2, 8, 16, 12, 5
    inputs = make_inputs(batch, dim, n, length, *groups, softplus=True)
    options = make_options(batch, dim, n, length, torch.float32, ("D", "z", "delta_bias", "initial_state"))
    full = selective_scan(**inputs, **options, delta_softplus=True, backend="reference")

    def cut(t, stop):
        return t[..., :stop]

    head = {k: cut(v, prefix) if k in ("u", "delta", "B", "C", "z") else v for k, v in {**inputs, **options}.items()}
    _, state = selective_scan(**head, delta_softplus=True, return_final_state=True, backend="reference")
    state_storage = state.data_ptr()
    steps = [selective_state_update(state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"],
                                    inputs["B"][..., t], inputs["C"][..., t], D=options["D"], z=options["z"][..., t],
                                    dt_bias=options["delta_bias"], dt_softplus=True, backend=backend)
             for t in range(prefix, length)]
    assert state.data_ptr() == state_storage
    assert rel_err(torch.stack(steps, dim=-1), full[..., prefix:]) < 1e-5
    _, final = selective_scan(**inputs, **options, delta_softplus=True, return_final_state=True, backend="reference")
    assert rel_err(state, final) < 1e-5


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_step_matches_float64_loop(backend, dtype, tol):
    batch, dim, n = 3, 6, 4
    inputs = make_inputs(batch, dim, n, 1, 3, None, dtype=dtype)
    D, z, h0 = torch.randn(dim), torch.randn(batch, dim).to(dtype), torch.randn(batch, dim, n)
    state = h0.clone()
    out = selective_state_update(state, inputs["u"][..., 0], inputs["delta"][..., 0], inputs["A"],
                                 inputs["B"][..., 0], inputs["C"][..., 0], D=D, z=z, backend=backend)
    ref, ref_state = loop_scan(**inputs, D=D, z=z[..., None], h0=h0)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert rel_err(out, ref[..., 0]) < tol and rel_err(state, ref_state) < tol


def test_bad_inputs_name_the_argument():
    inputs = make_inputs(2, 6, 4, 5, None, None)

    def call(**changes):
        selective_scan(**{**inputs, **changes})

    with pytest.raises(ValueError, match=r"delta: expected shape \(2, 6, 5\), got \(2, 6, 4\)"):
        call(delta=torch.rand(2, 6, 4))
    with pytest.raises(ValueError, match="A: expected shape"):
        call(A=-torch.rand(5, 4))
    with pytest.raises(ValueError, match=r"B: number of groups must divide dim=6, got 4"):
        call(B=torch.randn(2, 4, 4, 5))
    with pytest.raises(ValueError, match="C: expected shape"):
        call(C=torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="A: expected dtype"):
        call(A=inputs["A"].bfloat16())
    with pytest.raises(TypeError, match="u: expected dtype"):
        call(u=torch.randint(0, 3, (2, 6, 5)))
    with pytest.raises(TypeError, match="seq_idx: expected dtype"):
        call(seq_idx=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="seq_idx: expected shape"):
        call(seq_idx=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        call(initial_state=torch.zeros(2, 6, 3))
    with pytest.raises(ValueError, match="D: expected shape"):
        call(D=torch.ones(2, 6))
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="u: expected a sequence length L >= 1"):
        call(**make_inputs(2, 6, 4, 0, None, None))

    state = torch.zeros(2, 6, 4)
    x, B = torch.randn(2, 6), torch.randn(2, 4)
    with pytest.raises(TypeError, match="state: expected dtype"):
        selective_state_update(state.int(), x, x, inputs["A"], B, B)
    with pytest.raises(ValueError, match="dt: expected shape"):
        selective_state_update(state, x, x[:, :3], inputs["A"], B, B)
    with pytest.raises(ValueError, match="C: number of groups must divide dim=6, got 5"):
        selective_state_update(state, x, x, inputs["A"], B, torch.randn(2, 5, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Layers pass views (e.g. channels-last projections transposed); results must not depend on layout."""
    batch, dim, n, length = 2, 8, 4, 9
    inputs = make_inputs(batch, dim, n, length, 2, None, softplus=True)
    options = make_options(batch, dim, n, length, torch.float32, ("D", "z", "delta_bias"))
    strided = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 3 else v
               for k, v in {**inputs, **options}.items()}
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    out = selective_scan(**strided, delta_softplus=True, backend=backend)
    ref = selective_scan(**inputs, **options, delta_softplus=True, backend=backend)
    assert rel_err(out, ref) < 1e-6
