"""Tokenizers: a built-in byte-level one (no files needed) and Hugging Face `tokenizer.json` files.

A tokenizer saved beside a checkpoint is found again by `load_tokenizer(directory)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence

from mambakit._io import atomic_path, write_json

BYTE_TOKENIZER_FILE = "mambakit_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; token 256 ends a document (`eos_token_id`)."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids`, end-of-document tokens dropped (for streaming partial UTF-8)."""
        return bytes(int(i) for i in ids if int(i) < 256)

    def save(self, directory: str | os.PathLike) -> None:
        write_json(Path(directory) / BYTE_TOKENIZER_FILE, {"type": "byte", "vocab_size": self.vocab_size})


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a `tokenizer.json` (GPT-NeoX for the official checkpoints)."""

    EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        self._tok = _Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = (self._tok.token_to_id(t) for t in self.EOS_CANDIDATES)
        self.eos_token_id = next((i for i in ids if i is not None), None)

    @classmethod
    def from_tokenizers(cls, tok) -> "HFTokenizer":
        """Wrap an in-memory `tokenizers.Tokenizer` (e.g. one just trained)."""
        self = cls.__new__(cls)
        self.path, self._tok = None, tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = (tok.token_to_id(t) for t in cls.EOS_CANDIDATES)
        self.eos_token_id = next((i for i in ids if i is not None), None)
        return self

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        with atomic_path(Path(directory) / HF_TOKENIZER_FILE) as tmp:
            self._tok.save(str(tmp))


def load_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
    """The tokenizer at `path`: a `tokenizer.json` file, or a directory holding one (or a byte-tokenizer
    marker); `None` or "byte" gives the built-in byte-level tokenizer."""
    if path is None or str(path) == "byte":
        return ByteTokenizer()
    path = Path(path)
    if path.is_file():
        return HFTokenizer(path)
    if (path / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer(path / HF_TOKENIZER_FILE)
    marker = path / BYTE_TOKENIZER_FILE
    if marker.is_file():
        kind = json.loads(marker.read_text()).get("type")
        if kind != "byte":
            raise ValueError(f"{marker}: expected type 'byte', got {kind!r}")
        return ByteTokenizer()
    raise FileNotFoundError(f"tokenizer: no {HF_TOKENIZER_FILE} or {BYTE_TOKENIZER_FILE} in {path}")
