import importlib
import io
import json
import math

import pytest
import torch

from mambakit.cli import main
from mambakit.generation import stream
from mambakit.generation.generate import decode_steps
from mambakit.tokenizer import ByteTokenizer

generate_module = importlib.import_module("mambakit.generation.generate")  # the attribute is the function


@pytest.fixture
def checkpoint(tmp_path, make_model):
    """(directory with a tiny random model + byte tokenizer, the in-memory model it was saved from)."""
    model = make_model("mamba2")
    model.save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    return tmp_path, model


def test_generate_round_trips_a_checkpoint_directory(checkpoint, capsys):
    path, model = checkpoint
    args = ["--max-new-tokens", "16", "--temperature", "0.9", "--top-p", "0.95", "--seed", "4"]
    assert main(["generate", "--model", str(path), "--prompt", "héllo", "--no-echo", *args]) == 0
    out, err = capsys.readouterr()
    expected = "".join(stream(model, "héllo", tokenizer=ByteTokenizer(), max_new_tokens=16, temperature=0.9,
                              top_k=0, top_p=0.95, seed=4))
    assert out == expected + "\n"
    assert "tok/s" in err
    assert main(["generate", "--model", str(path), "--prompt", "héllo", *args]) == 0
    assert capsys.readouterr().out == "héllo" + expected + "\n"


def test_generate_state_dtype_reaches_the_decoder(checkpoint, capsys, monkeypatch):
    path, _ = checkpoint
    asked = []

    def recording(model, prompts, options):
        asked.append(options.state_dtype)
        return decode_steps(model, prompts, options)

    monkeypatch.setattr(generate_module, "decode_steps", recording)
    for flag, dtype in (([], torch.float32), (["--state-dtype", "bfloat16"], torch.bfloat16)):
        assert main(["generate", "--model", str(path), "--prompt", "abc", "--max-new-tokens", "3", *flag]) == 0
    assert asked == [torch.float32, torch.bfloat16]


def test_generate_reads_prompt_file_and_stdin(checkpoint, capsys, monkeypatch, tmp_path):
    path, _ = checkpoint
    common = ["generate", "--model", str(path), "--max-new-tokens", "5", "--no-echo"]
    assert main([*common, "--prompt", "abc"]) == 0
    greedy = capsys.readouterr().out
    (tmp_path / "prompt.txt").write_text("abc")
    assert main([*common, "--prompt-file", str(tmp_path / "prompt.txt")]) == 0
    assert capsys.readouterr().out == greedy
    monkeypatch.setattr("sys.stdin", io.StringIO("abc"))
    assert main(common) == 0
    assert capsys.readouterr().out == greedy


@pytest.mark.parametrize(
    "extra, match",
    [(["--top-p", "1.5"], "top_p"), (["--temperature", "-1"], "temperature"),
     (["--max-new-tokens", "0"], "max-new-tokens"), (["--stop-token-id", "-2"], "stop_token_ids"),
     (["--prompt", ""], "empty"), (["--device", "nonsense"], "error"),
     (["--prefill-chunk", "0"], "--prefill-chunk: expected an int >= 1, got 0"),
     (["--state-dtype", "int8"], "--state-dtype: expected one of ['float32', 'bfloat16', 'float16'], got 'int8'")],
)
def test_generate_bad_arguments(checkpoint, capsys, extra, match):
    path, _ = checkpoint
    assert main(["generate", "--model", str(path), "--prompt", "x", *extra]) == 2
    assert match in capsys.readouterr().err


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "error" in capsys.readouterr().err


def test_score(checkpoint, capsys):
    path, model = checkpoint
    assert main(["score", "--model", str(path), "--text", "hello wörld", "--json", "--per-token"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = model.log_likelihood("hello wörld", ByteTokenizer())
    assert result["scored_tokens"] == len(expected.logprobs) == len(result["per_token"])
    assert math.isclose(result["perplexity"], expected.perplexity, rel_tol=1e-5)
    assert main(["score", "--model", str(path), "--text", "hello"]) == 0
    assert "perplexity" in capsys.readouterr().out
