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
