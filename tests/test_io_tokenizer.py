import json
import random

import pytest

from mambakit._io import atomic_path, write_json
from mambakit.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def random_text(n):
    alphabet = "abcdefghij é€😀\n\t{}()"
    return "".join(random.choice(alphabet) for _ in range(n))


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("crash while writing")
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_byte_tokenizer_round_trips_any_text_and_saves(tmp_path):
    tok = ByteTokenizer()
    text = random_text(300)
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids + [tok.eos_token_id]) == text
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_hf_tokenizer_from_file_and_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([random_text(200) for _ in range(50)], trainer)
    wrapped = HFTokenizer.from_tokenizers(tok)
    wrapped.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.eos_token_id == tok.token_to_id("<|endoftext|>")
    text = "hello world"
    assert loaded.encode(text) == wrapped.encode(text)
    assert load_tokenizer(tmp_path / "tokenizer.json").vocab_size == wrapped.vocab_size


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "mambakit_tokenizer.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="expected type 'byte', got 'sentencepiece'"):
        load_tokenizer(tmp_path)
