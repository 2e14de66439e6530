"""Bad input to a mixer is refused at its door, naming the argument, the expected and the actual value."""
import re

import pytest
import torch

from mambakit.layers import Mamba, Mamba2

LAYERS = {"mamba": (Mamba, "hidden_states"), "mamba2": (Mamba2, "u")}


def make(kind, d_model=32):
    cls, name = LAYERS[kind]
    kwargs = dict(d_state=8, headdim=16) if kind == "mamba2" else dict(d_state=8)
    return cls(d_model, **kwargs), name


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("shape", [(2, 32), (1, 2, 3, 32), (2, 5, 31)])
def test_wrong_shape_names_the_argument(kind, shape):
    layer, name = make(kind)
    with pytest.raises(ValueError, match=re.escape(f"{name}: expected shape (batch, seqlen, 32)")) as error:
        layer(torch.randn(*shape))
    assert str(error.value).endswith(f"got {tuple(shape)}")


@pytest.mark.parametrize("kind", LAYERS)
def test_dtype_other_than_the_weights_is_refused_outside_autocast(kind):
    layer, name = make(kind)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{name}: expected dtype torch.float32.*got torch.float64"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: accepted
        assert layer(torch.randn(2, 5, 32)).shape == (2, 5, 32)


@pytest.mark.parametrize("kind", LAYERS)
def test_not_a_tensor(kind):
    layer, name = make(kind)
    with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor, got list"):
        layer([[0.0] * 32])


@pytest.mark.parametrize("kind", LAYERS)
def test_step_refuses_states_that_do_not_fit(kind):
    """`step` takes the caller's states (its ops then run unchecked): a wrong one is refused by name."""
    layer, _ = make(kind)
    conv_state, ssm_state = layer.allocate_inference_cache(2, 1)
    x = torch.randn(2, 1, 32)
    bad = {"wider conv_state": ((torch.randn(2, conv_state.shape[1] + 1, conv_state.shape[2]), ssm_state),
                                "conv_state: expected shape"),
           "ssm_state for 3 rows": ((conv_state, torch.randn(3, *ssm_state.shape[1:])), "ssm_state: expected shape"),
           "int32 ssm_state": ((conv_state, ssm_state.to(torch.int32)), "ssm_state: expected dtype"),
           "strided ssm_state": ((conv_state, torch.randn(*ssm_state.shape[:-1], 2 * ssm_state.shape[-1])[..., ::2]),
                                 "ssm_state: expected a contiguous tensor")}
    for (states, message) in bad.values():
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            layer.step(x, *states)
    with torch.no_grad():
        out, _, _ = layer.step(x, torch.randn_like(conv_state), torch.randn_like(ssm_state))
    assert out.shape == (2, 1, 32) and out.isfinite().all()
