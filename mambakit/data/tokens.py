"""A corpus tokenized once into a memory-mapped token file, reused by every later run.

A token folder holds `tokens.bin` (the token ids of every document back to back, each document
followed by the tokenizer's end-of-document token when it has one), `doc_starts.npy` (the offset
of each document's first token) and `meta.json`, written last: a folder without it is incomplete.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mambakit._io import atomic_path, write_json
from mambakit.data.corpus import read_pieces
from mambakit.tokenizer import ByteTokenizer, Tokenizer

META_FILE = "meta.json"
FORMAT_VERSION = 1


def cache_root() -> Path:
    """Where token folders live: $MAMBAKIT_CACHE, else ~/.cache/mambakit/tokens."""
    return Path(os.environ.get("MAMBAKIT_CACHE", Path.home() / ".cache" / "mambakit")) / "tokens"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer's saved files: two tokenizers with equal files tokenize alike."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for f in sorted(Path(tmp).iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def corpus_key(files: Sequence[Path], tokenizer: Tokenizer) -> str:
    """Names the token folder of (these files as they are now, this tokenizer)."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION}:{tokenizer_fingerprint(tokenizer)}".encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as int64 (the byte tokenizer through numpy, without a Python list)."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


@dataclass
class TokenFile:
    """An opened token folder: `tokens` is a read-only memmap, nothing is read until indexed."""

    path: Path
    tokens: np.ndarray  # (num_tokens,) uint16 | uint32, memory-mapped
    doc_starts: np.ndarray  # (num_docs,) int64, ascending, doc_starts[0] == 0
    meta: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenFile":
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"token folder {path}: no {META_FILE} (not built, or the build was interrupted)")
        meta = json.loads(meta_file.read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))
        doc_starts = np.load(path / "doc_starts.npy", allow_pickle=False)
        return cls(path, tokens, doc_starts, meta)

    def __len__(self) -> int:
        return len(self.tokens)


def build_token_file(
    files: Sequence[Path],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TokenFile:
    """Tokenize `files` into a token folder (under `cache_root()` by default) unless it already exists.

    Each file is one document; it streams through in pieces, so memory stays bounded whatever the
    corpus size. `progress(files_done, files_total)` is called after each file.
    """
    out = Path(out_dir) if out_dir is not None else cache_root() / corpus_key(files, tokenizer)
    if (out / META_FILE).is_file():
        return TokenFile.open(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"token cache: cannot create {out} ({err.strerror}); set MAMBAKIT_CACHE to a "
                                 "writable folder") from None
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_token_id
    doc_starts, num_tokens = [], 0
    with atomic_path(out / "tokens.bin") as tmp, open(tmp, "wb") as sink:
        for i, f in enumerate(files):
            start = num_tokens
            for piece in read_pieces(f):
                ids = encode_text(tokenizer, piece)
                sink.write(ids.astype(dtype).tobytes())
                num_tokens += len(ids)
            if eos is not None:
                sink.write(np.asarray([eos], dtype=dtype).tobytes())
                num_tokens += 1
            if num_tokens > start:
                doc_starts.append(start)
            if progress is not None:
                progress(i + 1, len(files))
        sink.flush()
    if num_tokens < 2:
        raise ValueError(f"data: the corpus ({len(files)} files) holds {num_tokens} tokens, need at least 2")
    with atomic_path(out / "doc_starts.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(doc_starts, dtype=np.int64), allow_pickle=False)
    write_json(out / META_FILE, {
        "format_version": FORMAT_VERSION, "dtype": dtype.name, "num_tokens": num_tokens,
        "num_docs": len(doc_starts), "vocab_size": tokenizer.vocab_size, "eos_token_id": eos,
        "num_files": len(files), "tokenizer": tokenizer_fingerprint(tokenizer),
    })
    return TokenFile.open(out)
