"""oneDNN-prepacked linear layers against the plain ones, on fresh random data and tiny random models; the CLI."""
import copy

import pytest
import torch
from torch import nn

from mambakit import prepack, quantize
from mambakit.bench.common import rel_err
from mambakit.cli import main
from mambakit.generation import generate
from mambakit.models import MambaLMHeadModel
from mambakit.prepacking import PackedLinear, prepack_available
from mambakit.quantization import Int8Linear

pytestmark = pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN linear ops")
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # ||out - ref|| / ||ref||


@pytest.mark.parametrize("rows", [1, 8, 300])  # a decode step, a batch of steps, a prefill
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_the_float64_product(rows, dtype):
    linear = nn.Linear(96, 40).to(dtype)
    x = torch.randn(rows, 3, 96, dtype=dtype).transpose(0, 1)  # a strided input
    expected = x.double() @ linear.weight.double().T + linear.bias.double()
    out = PackedLinear.from_linear(linear)(x)
    assert out.shape == (3, rows, 40) and out.dtype == dtype
    assert rel_err(out, expected) < TOLERANCES[dtype]
    assert rel_err(out, linear(x)) < TOLERANCES[dtype]


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_model_keeps_logits_and_greedy_tokens(make_model, vocab, kind, dtype):
    model = make_model(kind).to(dtype)
    packed = prepack(copy.deepcopy(model))
    ids = torch.randint(0, vocab, (3, 24))
    with torch.no_grad():
        assert rel_err(packed(ids).logits, model(ids).logits) < TOLERANCES[dtype]
    assert torch.equal(generate(packed, ids, max_length=40), generate(model, ids, max_length=40))


def test_prepack_replaces_the_projections_and_leaves_the_rest(make_model):
    model = prepack(make_model("hybrid"))
    mamba2 = model.backbone.layers[0].mixer
    assert isinstance(model.lm_head, PackedLinear)
    assert isinstance(mamba2.in_proj, PackedLinear) and isinstance(mamba2.out_proj, PackedLinear)
    assert isinstance(model.backbone.layers[0].mlp.fc1, PackedLinear)
    mamba1 = prepack(make_model("mamba1")).backbone.layers[0].mixer
    assert isinstance(mamba1.x_proj, PackedLinear) and type(mamba1.dt_proj) is nn.Linear  # the step reads its weight
    quantized = prepack(quantize(make_model("mamba2")))
    assert isinstance(quantized.lm_head, Int8Linear)  # an int8 layer stays int8


def test_prepacked_model_refuses_to_be_saved(make_model, tmp_path):
    with pytest.raises(RuntimeError, match="prepacked"):
        prepack(make_model("mamba2")).save_pretrained(tmp_path)


def test_cli_prepacks_by_default_on_the_cpu_and_not_with_no_prepack(make_model, tmp_path, capsys, monkeypatch):
    make_model("mamba2").save_pretrained(tmp_path)
    packed = []
    monkeypatch.setattr("mambakit.prepacking.PackedLinear.from_linear",
                        classmethod(lambda cls, linear: packed.append(linear) or linear))
    common = ["generate", "--model", str(tmp_path), "--tokenizer", "byte", "--prompt", "ab", "--max-new-tokens", "3",
              "--device", "cpu"]
    assert main(common) == 0 and packed
    packed.clear()
    assert main([*common, "--no-prepack"]) == 0 and not packed
    capsys.readouterr()
