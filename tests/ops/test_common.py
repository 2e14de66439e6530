import pytest
import torch

from mambakit.ops import _common
from mambakit.ops._common import check_dtype, check_same_device, check_shape, choose_backend, dispatch


def test_explicit_backend_wins_and_unknown_names_fail(monkeypatch):
    monkeypatch.delenv(_common.BACKEND_ENV, raising=False)
    x = torch.randn(3)
    assert choose_backend("reference", x, ("reference", "cpu")) == "reference"
    with pytest.raises(ValueError, match="backend: expected one of"):
        choose_backend("cuda", x, ("reference",))
    with pytest.raises(ValueError, match=r"backend: this op has \('reference',\), got 'cpu'"):
        choose_backend("cpu", x, ("reference",))


def test_device_default_and_environment_override(monkeypatch):
    x = torch.randn(3)
    monkeypatch.delenv(_common.BACKEND_ENV, raising=False)
    assert choose_backend(None, x, ("reference", "cpu")) == "cpu"
    assert choose_backend(None, x, ("reference",)) == "reference"
    monkeypatch.setenv(_common.BACKEND_ENV, "reference")
    assert choose_backend(None, x, ("reference", "cpu")) == "reference"
    # An environment request for a path this op lacks falls back to the default instead of failing.
    monkeypatch.setenv(_common.BACKEND_ENV, "triton")
    assert choose_backend(None, x, ("reference", "cpu")) == "cpu"


def test_dispatch_loads_only_the_chosen_path(monkeypatch):
    monkeypatch.delenv(_common.BACKEND_ENV, raising=False)
    loaded = []

    def loader(name):
        def load():
            loaded.append(name)
            return lambda: name
        return load

    fn = dispatch({"reference": loader("reference"), "cpu": loader("cpu")}, None, torch.randn(2))
    assert fn() == "cpu" and loaded == ["cpu"]


def test_check_shape_names_argument_expected_and_actual():
    t = torch.randn(2, 3, 4)
    check_shape("u", t, 2, None, 4)
    check_shape("u", None, 1)
    with pytest.raises(ValueError, match=r"u: expected shape \(2, \*, 5\), got \(2, 3, 4\)"):
        check_shape("u", t, 2, None, 5)
    with pytest.raises(ValueError, match=r"u: expected shape \(2, 3\), got \(2, 3, 4\)"):
        check_shape("u", t, 2, 3)
    with pytest.raises(TypeError, match="u: expected a torch.Tensor, got list"):
        check_shape("u", [1, 2], 2)


def test_check_dtype_and_device():
    check_dtype("A", torch.randn(2), (torch.float32,))
    with pytest.raises(TypeError, match=r"A: expected dtype in \(float32\), got float16"):
        check_dtype("A", torch.randn(2).half(), (torch.float32,))
    check_same_device(u=torch.randn(2), delta=torch.randn(2), D=None)
    with pytest.raises(ValueError, match="u on cpu, delta on meta"):
        check_same_device(u=torch.randn(2), delta=torch.empty(2, device="meta"))


def test_eager_autograd_runs_the_pieces_and_passes_none_for_unused_outputs():
    seen = {}

    def forward(x, scale):
        return x * scale, x.exp()

    def setup_context(ctx, inputs, outputs):
        ctx.save_for_backward(inputs[0], outputs[1])
        ctx.scale = inputs[1]

    def backward(ctx, d_scaled, d_exp):
        seen["d_exp"] = d_exp
        x, e = ctx.saved_tensors
        grad = d_scaled * ctx.scale if d_scaled is not None else torch.zeros_like(x)
        return (grad + d_exp * e if d_exp is not None else grad), None

    op = _common.eager_autograd(forward, setup_context, backward)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    scale = float(torch.rand(()) + 0.5)
    scaled, _ = op(x, scale)
    (g,) = torch.autograd.grad(scaled.sum(), x)
    assert torch.allclose(g, torch.full_like(x, scale)) and seen["d_exp"] is None
    assert torch.autograd.gradcheck(lambda t: sum(o.sum() for o in op(t, scale)), (x,))
    with torch.no_grad():  # inference calls the forward body alone: same values, nothing recorded
        scaled_again, exp = op(x, scale)
    assert torch.equal(scaled_again, scaled) and exp.grad_fn is None and not exp.requires_grad


def test_custom_op_if_compiling_picks_the_custom_op_only_under_compile():
    picked = []

    def f(x):
        picked.append(_common.custom_op_if_compiling("custom", "eager"))
        return x + 1

    f(torch.zeros(2))
    torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(3))
    assert picked == ["eager", "custom"]
