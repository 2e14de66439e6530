"""Token files (memory-mapped, streamed), packing into windows, the train/validation split, data order."""
import random

import numpy as np
import pytest
import torch

from mambakit.data import (PackedDataset, TokenFile, build_token_file, corpus_files, rank_sample_offset, read_pieces,
                           select_corpus)
from mambakit.data.tokenizer_training import train_bpe_tokenizer
from mambakit.tokenizer import ByteTokenizer

WORDS = ["state", "space", "model", "selective", "scan", "über", "naïve", "日本", "def", "return", "(", ")", "\n"]


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture
def corpus(tmp_path, fresh_seed):
    rng = random.Random(fresh_seed)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    texts = {}
    for i in range(7):
        path = folder / ("sub" if i % 2 else ".") / f"doc{i}.txt"
        texts[path.resolve()] = random_text(rng, rng.randrange(50, 400))
        path.write_text(texts[path.resolve()], encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    return folder, texts


def test_corpus_files_finds_text_recursively_in_stable_order(corpus):
    folder, texts = corpus
    files = corpus_files([folder])
    assert sorted(f.resolve() for f in files) == sorted(texts)
    assert files == corpus_files([folder])
    with pytest.raises(FileNotFoundError, match="data"):
        corpus_files([folder / "missing"])


def test_folder_files_are_chosen_by_content_not_name(tmp_path, fresh_seed):
    rng = random.Random(fresh_seed)
    folder = tmp_path / "mixed"
    (folder / ".git").mkdir(parents=True)
    text = {name: random_text(rng, 50) for name in ("a.pm", "b.rs", "Makefile", "c.go", "d.java", "e.txt")}
    for name, body in text.items():
        (folder / name).write_text(body, encoding="utf-8")
    (folder / "random.txt").write_bytes(bytes(rng.randrange(256) for _ in range(4096)) + b"\0")
    (folder / "latin1.txt").write_bytes(random_text(rng, 50).encode("utf-8").replace("ü".encode(), b"\xfc") + b"\xe9")
    (folder / "nul.md").write_bytes(b"text\0more")
    (folder / ".git" / "config").write_text("[core]\n")
    corpus = select_corpus([folder])
    assert sorted(f.name for f in corpus.files) == sorted(text)
    assert {k: sorted(f.name for f in v) for k, v in corpus.skipped.items()} == {
        "binary": ["nul.md", "random.txt"], "not UTF-8": ["latin1.txt"], "hidden": ["config"]}
    assert corpus.describe().startswith(f"{len(text)} files (skipped 4: ")

    picked = select_corpus([folder], include=["*.rs", "*.go"], exclude=["c.*"])
    assert [f.name for f in picked.files] == ["b.rs"] and [f.name for f in picked.skipped["excluded"]] == ["c.go"]
    with pytest.raises(ValueError, match=r"data: .*latin1.txt is not UTF-8"):
        select_corpus([folder / "latin1.txt"])  # a file named directly is never skipped silently
    with pytest.raises(ValueError, match=r"^data: no text files .*skipped 10: 2 binary, 1 hidden, 1 not UTF-8, 6 not"):
        select_corpus([folder], include=["random.txt", "nul.md", "latin1.txt", ".git/*"])


def test_default_corpus_is_real_text():
    files = corpus_files(None)
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert sum(f.stat().st_size for f in files) > 5_000_000


def test_read_pieces_streams_a_file_exactly(tmp_path, fresh_seed):
    text = random_text(random.Random(fresh_seed), 3000)
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(read_pieces(path, piece_chars=257))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces[:-1])


def test_token_file_holds_each_document_then_eos(corpus, tmp_path):
    folder, texts = corpus
    files = corpus_files([folder])
    tok = ByteTokenizer()
    tf = build_token_file(files, tok, tmp_path / "tokens")
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.uint16
    expected = []
    for f in files:
        expected += list(texts[f.resolve()].encode("utf-8")) + [tok.eos_token_id]
    assert tf.tokens.tolist() == expected
    starts = [0] + [i + 1 for i, t in enumerate(expected[:-1]) if t == tok.eos_token_id]
    assert tf.doc_starts.tolist() == starts
    again = build_token_file(files, tok, tmp_path / "tokens")  # built once, then reused
    assert again.meta == tf.meta


def test_interrupted_build_is_not_taken_for_a_token_file(tmp_path):
    (tmp_path / "tokens.bin").write_bytes(b"\x01\x00" * 10)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenFile.open(tmp_path)


def test_windows_split_and_shift(corpus, tmp_path):
    folder, _ = corpus
    tf = build_token_file(corpus_files([folder]), ByteTokenizer(), tmp_path / "tokens")
    seq_len = 17
    ds = PackedDataset(tf, seq_len, val_fraction=0.1, seed=3)
    n = (len(tf) - 1) // seq_len
    train, val = set(ds.train_windows.tolist()), set(ds.val_windows.tolist())
    assert not train & val and train | val == set(range(n)) and 0 < len(val) < len(train)
    batch = ds.windows_batch([int(w) for w in ds.val_windows[:3]])
    for row, w in enumerate(ds.val_windows[:3]):
        window = torch.from_numpy(tf.tokens[w * seq_len: w * seq_len + seq_len + 1].astype(np.int64))
        assert torch.equal(batch.input_ids[row], window[:-1]) and torch.equal(batch.targets[row], window[1:])


def test_training_order_is_a_seeded_permutation_per_epoch(corpus, tmp_path):
    folder, _ = corpus
    tf = build_token_file(corpus_files([folder]), ByteTokenizer(), tmp_path / "tokens")
    ds = PackedDataset(tf, 8, val_fraction=0.05, seed=11)
    n = len(ds.train_windows)
    epoch0 = [ds.train_window(k) for k in range(n)]
    epoch1 = [ds.train_window(k) for k in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(ds.train_windows.tolist()) == sorted(epoch1)
    assert epoch0 != epoch1
    fresh = PackedDataset(tf, 8, val_fraction=0.05, seed=11)
    backwards = range(n + 5, n - 5, -1)  # any access order, across an epoch boundary
    assert [fresh.train_window(k) for k in backwards] == [ds.train_window(k) for k in backwards]
    other = PackedDataset(tf, 8, val_fraction=0.05, seed=12)
    assert [other.train_window(k) for k in range(n)] != epoch0


def test_seq_idx_follows_document_boundaries(corpus, tmp_path):
    folder, _ = corpus
    tok = ByteTokenizer()
    tf = build_token_file(corpus_files([folder]), tok, tmp_path / "tokens")
    ds = PackedDataset(tf, 64, val_fraction=0.0, with_seq_idx=True)
    windows = list(range(len(ds.train_windows)))
    batch = ds.windows_batch(windows)
    for row in range(len(windows)):
        ids = batch.input_ids[row].tolist()
        expected, doc = [], 0
        for i, t in enumerate(ids):  # a new document starts right after each end-of-document token
            if i > 0 and ids[i - 1] == tok.eos_token_id:
                doc += 1
            expected.append(doc)
        assert batch.seq_idx[row].tolist() == expected
    assert batch.seq_idx.dtype == torch.int32 and int(batch.seq_idx.max()) > 0


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_ranks_share_out_exactly_the_global_batch(world, accum):
    micro = 3
    global_batch = world * accum * micro
    for step in range(3):
        first = step * global_batch
        taken = [rank_sample_offset(first, m, r, world, micro) + i
                 for m in range(accum) for r in range(world) for i in range(micro)]
        assert sorted(taken) == list(range(first, first + global_batch))


def test_trained_bpe_round_trips_and_builds_token_file(corpus, tmp_path):
    folder, texts = corpus
    files = corpus_files([folder])
    tok = train_bpe_tokenizer(files, vocab_size=300)
    assert tok.vocab_size <= 300 and tok.eos_token_id is not None
    text = texts[files[0].resolve()]
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode("utf-8"))
    tf = build_token_file(files, tok, tmp_path / "bpe_tokens")
    assert tf.tokens[: len(ids) + 1].tolist() == ids + [tok.eos_token_id]
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(files, vocab_size=100)
