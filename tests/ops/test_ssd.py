"""Mamba-2 SSD and its decode step against an independent float64 loop over time, on every path."""
import importlib

import pytest
import torch

from mambakit.bench.common import rel_err
from mambakit.ops import mamba_chunk_scan_combined, ssd, ssd_state_update
from mambakit.ops._common import triton_available

ssd_module = importlib.import_module("mambakit.ops.ssd")  # `mambakit.ops.ssd` the attribute is the function

# Tensors here live on the CPU: the Triton path runs only in its CPU interpreter (about 100x slower),
# on the lighter cases; tests/ops/test_triton_ssd.py covers it on the GPU.
INTERPRETED_TRITON = ["triton"] if triton_available() and not torch.cuda.is_available() else []
BACKENDS = [name for name in ssd_module._IMPLS if name != "triton"]
STEP_BACKENDS = [name for name in ssd_module._STEP_IMPLS if name != "triton"]
LIGHT_BACKENDS = BACKENDS + [n for n in INTERPRETED_TRITON if n in ssd_module._IMPLS]
LIGHT_STEP_BACKENDS = STEP_BACKENDS + [n for n in INTERPRETED_TRITON if n in ssd_module._STEP_IMPLS]


def loop_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None, h0=None,
             seq_idx=None):
    """Ground truth in float64, one step at a time: h = exp(dt A) h + dt x B^T, y = h C + D x.

    Returns y (batch, L, nheads, headdim) and the final state (batch, nheads, headdim, N).
    """
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, length, nheads, headdim = x.shape
    group = torch.arange(nheads) // (nheads // B.shape[2])
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    if dt_limit is not None:
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    h = torch.zeros(batch, nheads, headdim, B.shape[3], dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group, None, :]
        y = (h * C[:, t, group, None, :]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D.double()[:, None] if D.dim() == 1 else D.double())
        if z is not None:
            zt = z[:, t].double()
            y = y * zt * torch.sigmoid(zt)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def make_inputs(batch, length, nheads, headdim, ngroups, N, dtype=torch.float32, softplus=False):
    """Random inputs in the ranges a Mamba-2 layer sees: A ~ -U(0.1, 2), positive dt (or raw dt for softplus)."""
    dt = torch.randn(batch, length, nheads) if softplus else torch.rand(batch, length, nheads) * 0.5 + 0.01
    return dict(
        x=torch.randn(batch, length, nheads, headdim).to(dtype),
        dt=dt.to(dtype),
        A=-(torch.rand(nheads) * 1.9 + 0.1),
        B=torch.randn(batch, length, ngroups, N).to(dtype),
        C=torch.randn(batch, length, ngroups, N).to(dtype),
    )


# (batch, L, nheads, headdim, ngroups, N, chunk_size): L below, above and not a multiple of the chunk.
SHAPES = [
    (2, 37, 4, 3, 1, 5, 16),
    (1, 1, 2, 4, 2, 3, 32),
    (2, 130, 4, 2, 2, 4, 64),
    (1, 64, 6, 2, 3, 8, 32),
]
OPTIONS = ["plain", "D_head+z", "D_channel+dt_bias+softplus", "dt_limit+initial_states", "all"]


def optional_inputs(option, batch, length, nheads, headdim, N):
    extra = {}
    if option in ("D_head+z", "all"):
        extra["D"] = torch.randn(nheads)
        extra["z"] = torch.randn(batch, length, nheads, headdim)
    if option in ("D_channel+dt_bias+softplus", "all"):
        extra["D"] = torch.randn(nheads, headdim)
        extra["dt_bias"] = torch.randn(nheads) * 0.5
        extra["dt_softplus"] = True
    if option in ("dt_limit+initial_states", "all"):
        extra["dt_limit"] = (0.05, 0.3)
        extra["initial_states"] = torch.randn(batch, nheads, headdim, N)
    return extra


LOOP_CASES = [(backend, shape, option) for backend in BACKENDS for shape in SHAPES for option in OPTIONS]
LOOP_CASES += [(backend, shape, "all") for backend in LIGHT_BACKENDS if backend not in BACKENDS
               for shape in SHAPES if shape[1] <= 64]


@pytest.mark.parametrize("backend,shape,option", LOOP_CASES,
                         ids=["-".join([b, "x".join(map(str, s)), o]) for b, s, o in LOOP_CASES])
def test_matches_loop(backend, shape, option):
    batch, length, nheads, headdim, ngroups, N, chunk_size = shape
    inputs = make_inputs(batch, length, nheads, headdim, ngroups, N, softplus="softplus" in option)
    extra = optional_inputs(option, batch, length, nheads, headdim, N)
    out, final = ssd(**inputs, chunk_size=chunk_size, **extra, return_final_states=True, backend=backend)
    ref, ref_final = loop_ssd(**inputs, D=extra.get("D"), z=extra.get("z"), dt_bias=extra.get("dt_bias"),
                              dt_softplus=extra.get("dt_softplus", False), dt_limit=extra.get("dt_limit"),
                              h0=extra.get("initial_states"))
    assert out.shape == inputs["x"].shape and out.dtype == torch.float32
    assert final.shape == (batch, nheads, headdim, N) and final.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    assert rel_err(final, ref_final) < 1e-5


def packed_lengths(chunk_size):
    """Many short sequences, several ending exactly on a chunk edge, then a few random lengths."""
    fixed = [chunk_size, 5, chunk_size - 5, 1, 2 * chunk_size - 1, chunk_size, 3, 1]
    return fixed + torch.randint(1, chunk_size + 8, (4,)).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_equal_separate_runs(backend):
    chunk_size, nheads, headdim, ngroups, N = 16, 4, 3, 2, 5
    lengths = packed_lengths(chunk_size)
    total = sum(lengths)
    inputs = make_inputs(1, total, nheads, headdim, ngroups, N, softplus=True)
    extra = dict(D=torch.randn(nheads), z=torch.randn(1, total, nheads, headdim), dt_bias=torch.randn(nheads),
                 dt_softplus=True)
    h0 = torch.randn(1, nheads, headdim, N)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None]

    out, final, varlen = ssd(**inputs, chunk_size=chunk_size, **extra, initial_states=h0, seq_idx=seq_idx,
                             cu_seqlens=cu_seqlens, return_final_states=True, return_varlen_states=True,
                             backend=backend)
    refs, ref_finals = [], []
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        piece = {k: v[:, start:end] for k, v in inputs.items() if k != "A"}
        y, h = loop_ssd(**piece, A=inputs["A"], D=extra["D"], z=extra["z"][:, start:end], dt_bias=extra["dt_bias"],
                        dt_softplus=True, h0=h0 if i == 0 else None)
        refs.append(y)
        ref_finals.append(h)
    assert rel_err(out, torch.cat(refs, dim=1)) < 1e-5
    assert varlen.shape == (len(lengths), nheads, headdim, N)
    assert rel_err(varlen, torch.cat(ref_finals)) < 1e-5
    assert rel_err(final, ref_finals[-1]) < 1e-5

    # cu_seqlens alone marks the same sequences as seq_idx.
    out_cu = ssd(**inputs, chunk_size=chunk_size, **extra, initial_states=h0, cu_seqlens=cu_seqlens, backend=backend)
    assert rel_err(out_cu, out) < 1e-6


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
def test_state_resets_where_seq_idx_changes(backend):
    """Any labels, not only 0, 1, 2, ...: a run of equal values is one sequence."""
    length, nheads, headdim, ngroups, N = 50, 2, 3, 1, 4
    inputs = make_inputs(2, length, nheads, headdim, ngroups, N)
    seq_idx = torch.tensor([7] * 9 + [3] * 16 + [7] * 1 + [5] * 24, dtype=torch.int32).repeat(2, 1)
    seq_idx[1] = torch.randint(0, 2, (length,), dtype=torch.int32)  # many one-step sequences
    h0 = torch.randn(2, nheads, headdim, N)
    out, final = ssd(**inputs, chunk_size=16, initial_states=h0, seq_idx=seq_idx, return_final_states=True,
                     backend=backend)
    ref, ref_final = loop_ssd(**inputs, h0=h0, seq_idx=seq_idx)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(final, ref_final) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_independent_of_chunk_size(backend):
    length, nheads, headdim, ngroups, N = 200, 4, 4, 1, 8
    inputs = make_inputs(2, length, nheads, headdim, ngroups, N)
    seq_idx = torch.cat([torch.zeros(2, 70), torch.ones(2, 64), torch.full((2, 66), 2.0)], dim=1).to(torch.int32)
    h0, D = torch.randn(2, nheads, headdim, N), torch.randn(nheads)
    results = [ssd(**inputs, chunk_size=chunk_size, D=D, initial_states=h0,
                   seq_idx=seq_idx, return_final_states=True, backend=backend) for chunk_size in (16, 64, 256)]
    (out16, final16), *others = results
    for out, final in others:
        assert rel_err(out, out16) < 1e-5
        assert rel_err(final, final16) < 1e-5


def test_official_alias_argument_order():
    nheads, headdim, N, length = 4, 2, 3, 20
    inputs = make_inputs(1, length, nheads, headdim, 2, N, softplus=True)
    D, z, dt_bias = torch.randn(nheads), torch.randn(1, length, nheads, headdim), torch.randn(nheads)
    h0, seq_idx = torch.randn(1, nheads, headdim, N), torch.zeros(1, length, dtype=torch.int32)
    seq_idx[:, 9:] = 1
    cu_seqlens = torch.tensor([0, 9, length])
    args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
    official = mamba_chunk_scan_combined(*args, 8, D, z, dt_bias, h0, seq_idx, cu_seqlens, True, (0.0, 0.4),
                                         True, True)
    ours = ssd(*args, chunk_size=8, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.0, 0.4),
               initial_states=h0, seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_final_states=True,
               return_varlen_states=True)
    assert len(official) == 3
    for a, b in zip(official, ours):
        assert torch.equal(a, b)


def test_matches_selective_scan_with_scalar_A_per_head():
    """SSD is the selective scan with A a scalar per head: both ops must agree on the mapped inputs."""
    from mambakit.ops import selective_scan

    batch, length, nheads, headdim, ngroups, N = 2, 45, 4, 3, 2, 6
    inputs = make_inputs(batch, length, nheads, headdim, ngroups, N, softplus=True)
    D, z, dt_bias = torch.randn(nheads), torch.randn(batch, length, nheads, headdim), torch.randn(nheads)
    out = ssd(**inputs, chunk_size=16, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)

    dim = nheads * headdim
    per_channel = lambda t: t.repeat_interleave(headdim, dim=-1)  # (..., nheads) -> (..., nheads * headdim)
    scan = selective_scan(
        inputs["x"].reshape(batch, length, dim).transpose(1, 2),
        per_channel(inputs["dt"]).transpose(1, 2),
        per_channel(inputs["A"])[:, None].expand(dim, N).contiguous(),
        inputs["B"].permute(0, 2, 3, 1), inputs["C"].permute(0, 2, 3, 1),
        D=per_channel(D), z=z.reshape(batch, length, dim).transpose(1, 2), delta_bias=per_channel(dt_bias),
        delta_softplus=True, backend="reference")
    assert rel_err(out, scan.transpose(1, 2).reshape(batch, length, nheads, headdim)) < 1e-5


@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_gradcheck(with_seq_idx):
    batch, length, nheads, headdim, ngroups, N = 1, 7, 2, 2, 1, 3
    inputs = {k: v.double() for k, v in make_inputs(batch, length, nheads, headdim, ngroups, N, softplus=True).items()}
    inputs.update(D=torch.randn(nheads, dtype=torch.float64), z=torch.randn(batch, length, nheads, headdim,
                  dtype=torch.float64), dt_bias=torch.randn(nheads, dtype=torch.float64),
                  initial_states=torch.randn(batch, nheads, headdim, N, dtype=torch.float64))
    names = list(inputs)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2]], dtype=torch.int32) if with_seq_idx else None

    def fn(*tensors):
        out, final = ssd(**dict(zip(names, tensors)), chunk_size=3, dt_softplus=True, seq_idx=seq_idx,
                         return_final_states=True, backend="reference")
        return out, final

    tensors = [t.requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("backend", LIGHT_STEP_BACKENDS)
@pytest.mark.parametrize("ngroups", [1, 2])
def test_step_continues_parallel_forward(backend, ngroups):
    batch, prefix, length, nheads, headdim, N = 2, 21, 30, 4, 3, 5
    inputs = make_inputs(batch, length, nheads, headdim, ngroups, N, softplus=True)
    extra = dict(D=torch.randn(nheads, headdim), dt_bias=torch.randn(nheads), dt_softplus=True, dt_limit=(0.0, 1.0))
    z = torch.randn(batch, length, nheads, headdim)
    full = ssd(**inputs, chunk_size=8, z=z, **extra, backend="reference")
    _, state = ssd(**{k: v if k == "A" else v[:, :prefix] for k, v in inputs.items()}, chunk_size=8,
                   z=z[:, :prefix], **extra, return_final_states=True, backend="reference")
    steps = [ssd_state_update(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                              inputs["C"][:, t], z=z[:, t], **extra, backend=backend)
             for t in range(prefix, length)]
    assert rel_err(torch.stack(steps, dim=1), full[:, prefix:]) < 1e-5


def test_step_from_zero_matches_loop():
    batch, length, nheads, headdim, ngroups, N = 3, 12, 6, 2, 3, 4
    inputs = make_inputs(batch, length, nheads, headdim, ngroups, N)
    D = torch.randn(nheads)
    state = torch.zeros(batch, nheads, headdim, N)
    steps = [ssd_state_update(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                              inputs["C"][:, t], D=D) for t in range(length)]
    ref, ref_state = loop_ssd(**inputs, D=D)
    assert rel_err(torch.stack(steps, dim=1), ref) < 1e-5
    assert rel_err(state, ref_state) < 1e-5


def test_bf16_long_sequence_with_fast_decay_stays_finite():
    """4096 bf16 steps with |A dt| up to ~16 per step: no overflow, and the fp64 loop within bf16 tolerance."""
    batch, length, nheads, headdim, ngroups, N = 1, 4096, 2, 4, 1, 8
    inputs = make_inputs(batch, length, nheads, headdim, ngroups, N, dtype=torch.bfloat16, softplus=True)
    inputs["A"] = -(torch.rand(nheads) * 15 + 1)  # A ~ -U(1, 16), as Mamba-2 initializes it
    dt_bias = torch.full((nheads,), 0.5)
    out, final = ssd(**inputs, chunk_size=256, dt_bias=dt_bias, dt_softplus=True, return_final_states=True,
                     backend="reference")
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    ref, ref_final = loop_ssd(**inputs, dt_bias=dt_bias, dt_softplus=True)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(final, ref_final) < 1e-2


def _bad(**changes):
    return changes


BAD_INPUTS = {
    "x": _bad(x=torch.randn(2, 10, 4)),
    "dt": _bad(dt=torch.rand(2, 10, 3)),
    "A": _bad(A=-torch.rand(4, 1)),
    "B": _bad(B=torch.randn(2, 9, 2, 3)),
    "C": _bad(C=torch.randn(2, 10, 2, 4)),
    "ngroups": _bad(B=torch.randn(2, 10, 3, 3), C=torch.randn(2, 10, 3, 3)),
    "chunk_size": _bad(chunk_size=0),
    "D": _bad(D=torch.randn(3)),
    "z": _bad(z=torch.randn(2, 10, 4, 3)),
    "dt_bias": _bad(dt_bias=torch.randn(2)),
    "dt_limit": _bad(dt_limit=(1.0, 0.5)),
    "initial_states": _bad(initial_states=torch.randn(2, 4, 2, 4)),
    "seq_idx": _bad(seq_idx=torch.zeros(2, 10)),
    "cu_seqlens": _bad(cu_seqlens=torch.tensor([0, 4, 10])),  # batch is 2
    "return_varlen_states": _bad(return_varlen_states=True),
    "x_dtype": _bad(x=torch.zeros(2, 10, 4, 2, dtype=torch.int64)),
}
EXPECTED_NAME = {"ngroups": "B:", "return_varlen_states": "cu_seqlens:", "x_dtype": "x:"}


@pytest.mark.parametrize("mistake", list(BAD_INPUTS))
def test_bad_inputs_name_the_argument(mistake):
    args = dict(make_inputs(2, 10, 4, 2, 2, 3), chunk_size=4)
    args.update(BAD_INPUTS[mistake])
    with pytest.raises((ValueError, TypeError), match=EXPECTED_NAME.get(mistake, mistake + ":")):
        ssd(**args)


PACKING_MISTAKES = {  # cu_seqlens, seq_idx, the argument the error must name
    "cu_seqlens_short": ([0, 4, 9], None, "cu_seqlens:"),
    "cu_seqlens_unordered": ([0, 6, 4, 10], None, "cu_seqlens:"),
    "seq_idx_disagrees": ([0, 4, 10], [0] * 5 + [1] * 5, "seq_idx:"),
}


@pytest.mark.parametrize("mistake", list(PACKING_MISTAKES))
def test_bad_packed_sequences_name_the_argument(mistake):
    cu_seqlens, seq_idx, name = PACKING_MISTAKES[mistake]
    seq_idx = None if seq_idx is None else torch.tensor([seq_idx], dtype=torch.int32)
    with pytest.raises(ValueError, match=name):
        ssd(**make_inputs(1, 10, 4, 2, 2, 3), chunk_size=4, cu_seqlens=torch.tensor(cu_seqlens), seq_idx=seq_idx)


@pytest.mark.parametrize("mistake", ["state", "x", "dt", "B", "C", "D", "z", "dt_bias", "dt_limit"])
def test_step_bad_inputs_name_the_argument(mistake):
    batch, nheads, headdim, ngroups, N = 2, 4, 2, 2, 3
    args = dict(state=torch.zeros(batch, nheads, headdim, N), x=torch.randn(batch, nheads, headdim),
                dt=torch.rand(batch, nheads), A=-torch.rand(nheads), B=torch.randn(batch, ngroups, N),
                C=torch.randn(batch, ngroups, N))
    args[mistake] = {"state": torch.zeros(batch, nheads, headdim, N, dtype=torch.int32),
                     "x": torch.randn(batch, nheads, headdim + 1), "dt": torch.rand(batch, nheads, 1),
                     "B": torch.randn(batch, 3, N), "C": torch.randn(batch, ngroups, N + 1),
                     "D": torch.randn(nheads + 1), "z": torch.randn(batch, nheads), "dt_bias": torch.randn(1),
                     "dt_limit": (0.2, 0.1)}[mistake]
    with pytest.raises((ValueError, TypeError), match=mistake + ":"):
        ssd_state_update(**args)
