import json

import pytest
import torch
from safetensors.torch import load_file

from mambakit.cli import main
from mambakit.models import MambaLMHeadModel
from mambakit.tokenizer import HFTokenizer, load_tokenizer


def word_tokenizer(vocab_size: int) -> HFTokenizer:
    """A word-level tokenizer of `vocab_size` tokens "w0", "w1", ..., its end-of-text token w7."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return HFTokenizer.from_tokenizers(tok, eos_token_id=7)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_convert_official_to_hf_to_official(kind, tmp_path, tiny):
    model = tiny.build(kind, tie_embeddings=False)
    model.save_pretrained(tmp_path / "official", safe_serialization=False)
    word_tokenizer(model.config.vocab_size).save(tmp_path / "official")

    assert main(["convert", str(tmp_path / "official"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] in ("mamba", "mamba2") and hf_config["eos_token_id"] == 7
    assert load_tokenizer(tmp_path / "hf").encode("w3 w99 w7") == [3, 99, 7]
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "official", "--bin"]) == 0

    back = MambaLMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert back.config.vocab_size == model.config.vocab_size and back.tokenizer.eos_token_id == 7
    ids = tiny.random_ids(model)
    with torch.no_grad():
        assert tiny.rel_err(back(ids).logits, model(ids).logits) < 1e-6
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_convert_keeps_a_byte_tokenizer_so_the_output_generates(tmp_path, tiny):
    from mambakit.tokenizer import ByteTokenizer, load_tokenizer

    model = tiny.build("mamba2")
    model.save_pretrained(tmp_path / "src")
    ByteTokenizer().save(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert isinstance(load_tokenizer(tmp_path / "hf"), ByteTokenizer)


def test_convert_to_bfloat16(tmp_path, tiny):
    model = tiny.build("mamba1")
    model.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "official", "--dtype", "bfloat16"]) == 0
    stored = load_file(tmp_path / "dst" / "model.safetensors")
    assert stored["backbone.embedding.weight"].dtype == torch.bfloat16
    assert torch.equal(stored["backbone.embedding.weight"], model.backbone.embedding.weight.bfloat16())
    # dtype "auto" (the default) keeps what is stored
    assert main(["convert", str(tmp_path / "dst"), str(tmp_path / "again"), "--to", "hf"]) == 0
    assert load_file(tmp_path / "again" / "model.safetensors")["backbone.embeddings.weight"].dtype == torch.bfloat16


def test_convert_refuses_what_transformers_cannot_hold(tmp_path, tiny, capsys):
    tiny.build("hybrid").save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hf"]) == 2
    assert "attn_layer_idx" in capsys.readouterr().err
    assert not (tmp_path / "dst" / "config.json").exists()


def test_convert_reports_a_broken_source(tmp_path, tiny, capsys):
    tiny.build("mamba1").save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x00" * 10)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hf"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "dst"), "--to", "hf"]) == 2
    assert "missing" in capsys.readouterr().err


def test_convert_needs_a_target_layout(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path), str(tmp_path / "dst")])
    assert "--to" in capsys.readouterr().err
