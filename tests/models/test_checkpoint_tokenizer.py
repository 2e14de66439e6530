"""The tokenizer and its special tokens travel with a checkpoint: attached at load, written at save, named
by the files transformers writes, and an HF export generates in transformers what it generates in mambakit."""
import json

import pytest
import torch

from mambakit.models import MambaLMHeadModel
from mambakit.tokenizer import HFTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "</s>", "<pad>", "<s>"]


def word_tokenizer(vocab_size: int, **special_ids) -> HFTokenizer:
    """Word-level: "w0" ... "w{n-5}" then SPECIALS, each an id of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))] + SPECIALS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return HFTokenizer.from_tokenizers(tok, **special_ids)


def ids_of(tok) -> tuple:
    return tok.eos_token_id, tok.bos_token_id, tok.pad_token_id


def write(path, obj):
    path.write_text(json.dumps(obj))


def test_special_tokens_come_from_the_files_that_name_them(tmp_path):
    from tokenizers import Tokenizer

    word_tokenizer(20)._tok.save(str(tmp_path / "tokenizer.json"))  # a bare tokenizer.json, no companion file
    eot, eos, pad, bos = (Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id(t) for t in SPECIALS)
    assert ids_of(load_tokenizer(tmp_path)) == (eot, None, None)  # nothing names eos: the guess by name
    write(tmp_path / "special_tokens_map.json", {"pad_token": "<pad>", "eos_token": "<pad>"})
    write(tmp_path / "tokenizer_config.json", {"eos_token": "</s>", "bos_token": {"content": "<s>"}})
    assert ids_of(load_tokenizer(tmp_path)) == (eos, bos, pad)
    write(tmp_path / "config.json", {"model_type": "mamba", "eos_token_id": bos, "pad_token_id": None})
    assert ids_of(load_tokenizer(tmp_path)) == (bos, bos, pad)
    write(tmp_path / "generation_config.json", {"eos_token_id": [pad, eot]})
    assert ids_of(load_tokenizer(tmp_path / "tokenizer.json")) == (pad, bos, pad)


@pytest.mark.parametrize("name, content, field", [
    ("tokenizer_config.json", {"eos_token": "<nope>"}, "eos_token"),
    ("generation_config.json", {"pad_token_id": 20}, "pad_token_id"),
    ("config.json", {"bos_token_id": "1"}, "bos_token_id"),
    ("special_tokens_map.json", [1, 2], "JSON object"),
])
def test_a_special_token_that_is_no_token_is_refused_by_file_and_field(name, content, field, tmp_path):
    word_tokenizer(20).save(tmp_path)
    write(tmp_path / name, content)
    with pytest.raises(ValueError, match=f"{name}: {field}" if field != "JSON object" else f"{name}: .*{field}"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("format", ["official", "hf"])
def test_from_pretrained_attaches_the_saved_tokenizer_and_save_pretrained_writes_it(format, tmp_path, tiny):
    model = tiny.build("mamba2")
    assert model.tokenizer is None
    model.save_pretrained(tmp_path / "bare", format=format)
    assert MambaLMHeadModel.from_pretrained(tmp_path / "bare").tokenizer is None

    model.tokenizer = word_tokenizer(model.config.vocab_size, eos_token_id=5, pad_token_id=6)
    model.save_pretrained(tmp_path / "first", format=format)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path / "first")
    assert ids_of(loaded.tokenizer) == (5, None, 6)
    text = "w1 w2 w3"
    assert loaded.tokenizer.encode(text) == model.tokenizer.encode(text)
    assert "".join(loaded.stream(text, max_new_tokens=4)) == "".join(model.stream(text, max_new_tokens=4))
    loaded.save_pretrained(tmp_path / "second", format="official")  # and on to the next directory
    assert ids_of(MambaLMHeadModel.from_pretrained(tmp_path / "second").tokenizer) == (5, None, 6)


def first_new_token_after(tokens: list[int], at_most: int) -> int:
    """The last of tokens[:at_most + 1] that does not occur before it (so that greedy decoding first meets it there)."""
    return max((k for k in range(min(at_most + 1, len(tokens))) if tokens[k] not in tokens[:k]), default=0)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_an_hf_export_generates_in_transformers_what_it_generates_in_mambakit(kind, tmp_path, tiny):
    model = tiny.build(kind, tie_embeddings=False)  # vocab 101 in 104 rows
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab - len(SPECIALS), (1, 7))
    with torch.no_grad():  # padding rows whose logits dwarf the real ones: a model free to emit them would;
        # along the prompt's last hidden state (a random direction could be orthogonal to it, and lose)
        direction = model.backbone(prompt)[0, -1]
        scale = 1000 * model.lm_head.weight[:vocab].norm(dim=1).mean() / direction.norm()
        model.lm_head.weight[vocab:] = torch.stack([scale * direction, -scale * direction, scale * direction])
    with torch.no_grad():
        assert model(prompt).logits[0, -1].argmax() >= vocab  # the premise: unmasked, padding would win
    free = model.generate(prompt, max_new_tokens=10)[0, 7:].tolist()
    eos = free[first_new_token_after(free, 5)]  # an end-of-text token that greedy decoding meets
    model.tokenizer = word_tokenizer(vocab, eos_token_id=eos)
    model.save_pretrained(tmp_path, format="hf")

    ours = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    assert ours.config.vocab_size == vocab and ours.tokenizer.eos_token_id == eos
    expected = ours.generate(prompt, max_new_tokens=10, tokenizer=ours.tokenizer)
    assert expected[0, -1] == eos and (expected[0, 7:] < vocab).all()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = theirs.generate(prompt, max_new_tokens=10, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).eos_token_id == eos
