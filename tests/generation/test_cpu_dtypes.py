"""bf16 weights and int8 weight-only quantization against fp32, on fresh random tiny models; the CLI flags."""
import copy
import hashlib
import json

import pytest
import torch
from torch import nn

from mambakit import quantize
from mambakit.cli import main
from mambakit.generation import generate, log_likelihood
from mambakit.models import MambaLMHeadModel
from mambakit.quantization import FUSED_MAX_ROWS, Int8Linear
from mambakit.tokenizer import ByteTokenizer

# ||logits - fp32 logits|| / ||fp32 logits|| bounds for a 3-layer model (measured: about half of these).
TOLERANCES = {"bf16": 2e-2, "int8": 3e-2, "int8+bf16": 4e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def variant(model: MambaLMHeadModel, name: str) -> MambaLMHeadModel:
    """A copy of the fp32 model in bf16, int8-quantized, or both."""
    copied = copy.deepcopy(model)
    if "bf16" in name:
        copied.to(torch.bfloat16)
    return quantize(copied) if "int8" in name else copied


@pytest.mark.parametrize("rows", [1, 4, FUSED_MAX_ROWS + 1])  # the fused int8 kernel, then the dequantized matmul
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_its_dequantized_weight(rows, dtype):
    linear = nn.Linear(48, 80, bias=True, dtype=dtype)
    quantized = Int8Linear.from_linear(linear)
    weight = linear.weight.detach().double()
    scales = quantized.scales.double()
    # Rounding to the nearest step: each weight within half a step of its channel's grid (bf16 scale rounding aside).
    assert ((quantized.weight_int8.double() * scales[:, None] - weight).abs() <= 0.51 * scales[:, None] + 1e-2 *
            weight.abs()).all()
    x = torch.randn(1, 48, rows, dtype=dtype).transpose(1, 2)  # a strided view, as Mamba-1 x_proj gets
    expected = x.double() @ (quantized.weight_int8.double() * scales[:, None]).T + linear.bias.double()
    out = quantized(x)
    assert out.shape == (1, rows, 80) and out.dtype == dtype
    assert relative_error(out, expected) < 1e-2
    assert relative_error(out, linear(x).detach()) < 2e-2


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "hybrid"])
@pytest.mark.parametrize("name", list(TOLERANCES))
def test_prefill_and_decode_logits_close_to_fp32(make_model, vocab, kind, name):
    model = make_model(kind)
    other = variant(model, name)
    prompts = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        assert relative_error(other(prompts).logits, model(prompts).logits) < TOLERANCES[name]
    # Decode steps fed the same tokens (teacher forcing), so that every step's logits are comparable.
    ref = generate(model, prompts, max_length=40, return_dict_in_generate=True, output_scores=True)
    out = generate(other, prompts, max_length=40, return_dict_in_generate=True, output_scores=True,
                   teacher_outputs=ref.sequences)
    assert relative_error(torch.stack(out.scores), torch.stack(ref.scores)) < TOLERANCES[name]


def test_quantize_replaces_the_projections_and_keeps_the_rest(make_model):
    model = quantize(make_model("hybrid"))
    mamba2, attention = model.backbone.layers[0].mixer, model.backbone.layers[1].mixer
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(mamba2.in_proj, Int8Linear) and isinstance(mamba2.out_proj, Int8Linear)
    assert isinstance(model.backbone.layers[0].mlp.fc1, Int8Linear)
    assert isinstance(attention.in_proj, nn.Linear)  # attention layers stay in floating point
    mamba1 = quantize(make_model("mamba1")).backbone.layers[0].mixer
    assert isinstance(mamba1.x_proj, Int8Linear) and isinstance(mamba1.dt_proj, nn.Linear)


def test_quantize_rejects_bad_method(make_model):
    with pytest.raises(ValueError, match="method: expected one of \\('int8',\\), got 'int4'"):
        quantize(make_model("mamba2"), "int4")


def digest(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def restore_threads():
    """--threads sets torch's process-wide thread count: put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quantized_model_never_changes_the_checkpoint(tmp_path, make_model, capsys, restore_threads):
    make_model("mamba2").save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    before = digest(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "4",
                 "--quantize", "int8", "--dtype", "bfloat16", "--threads", "1"]) == 0
    model = quantize(MambaLMHeadModel.from_pretrained(tmp_path))
    with pytest.raises(RuntimeError, match="int8-quantized"):
        model.save_pretrained(tmp_path)
    assert digest(tmp_path) == before


def test_score_cli_quantized_equals_the_python_api(tmp_path, make_model, capsys):
    make_model("mamba1").save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    text = "the quick brown fox"
    assert main(["score", "--model", str(tmp_path), "--text", text, "--quantize", "int8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model = quantize(MambaLMHeadModel.from_pretrained(tmp_path).eval())
    assert printed["log_likelihood"] == pytest.approx(log_likelihood(model, text, ByteTokenizer()).total, rel=1e-6)


@pytest.mark.parametrize("command", ["generate", "score"])
@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int4"], "--quantize: expected one of ['int8'], got 'int4'"),
    (["--dtype", "float64"], "--dtype: expected one of ['auto', 'float32', 'bfloat16', 'float16'], got 'float64'"),
    (["--threads", "0"], "--threads: expected an int >= 1, got 0"),
])
def test_bad_cpu_flags_give_one_error_line(tmp_path, capsys, command, extra, message):
    text_flag = "--prompt" if command == "generate" else "--text"
    assert main([command, "--model", str(tmp_path), text_flag, "x", *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"mambakit {command}: error: {message}\n"
