"""Tokenizers: a built-in byte-level one (no files needed) and Hugging Face `tokenizer.json` files.

A tokenizer saved beside a checkpoint is found again by `load_tokenizer(directory)`. The special
tokens of a `tokenizer.json` are those its neighbours name, first found wins: the ids of
generation_config.json, then of config.json, then the tokens of tokenizer_config.json and
special_tokens_map.json. Only a tokenizer.json that none of them describes has its end-of-text
token guessed from its name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence

from mambakit._io import atomic_path, read_json_object, write_json

BYTE_TOKENIZER_FILE = "mambakit_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS = ("eos", "bos", "pad")
# (file, how it names a special token): "id" files hold <name>_token_id, "token" files <name>_token.
SPECIAL_TOKEN_SOURCES = (("generation_config.json", "id"), ("config.json", "id"),
                         (TOKENIZER_CONFIG_FILE, "token"), ("special_tokens_map.json", "token"))
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")  # the guess for a tokenizer.json that nothing describes


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; token 256 ends a document (`eos_token_id`)."""

    vocab_size = 257
    eos_token_id = 256
    bos_token_id = None
    pad_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids`, end-of-document tokens dropped (for streaming partial UTF-8)."""
        return bytes(int(i) for i in ids if int(i) < 256)

    def save(self, directory: str | os.PathLike) -> None:
        write_json(Path(directory) / BYTE_TOKENIZER_FILE, {"type": "byte", "vocab_size": self.vocab_size})


def _special_id(tok, path: Path, field: str, value) -> int | None:
    """The id `value` stands for (an id, a list of ids: the first, a token, or {"content": token})."""
    if isinstance(value, list):  # several end-of-text ids (generation_config): the first is the canonical one
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    if isinstance(value, str):
        token_id = tok.token_to_id(value)
        if token_id is None:
            raise ValueError(f"{path}: {field}: the token {value!r} is not in the tokenizer's vocabulary")
        return token_id
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ValueError(f"{path}: {field}: expected a token id in [0, {vocab}), got {value!r}")
    return value


def special_token_ids(tok, directory: Path | None) -> dict[str, int | None]:
    """{"eos_token_id", "bos_token_id", "pad_token_id"} of the `tokenizers.Tokenizer` `tok`, read from the
    files in `directory` (see the module's docstring); the eos guessed by name when no file names one."""
    found: dict[str, int | None] = {}
    for name, kind in SPECIAL_TOKEN_SOURCES:
        path = directory / name if directory is not None else None
        if path is None or not path.is_file():
            continue
        raw = read_json_object(path)
        for special in SPECIAL_TOKENS:
            field = f"{special}_token_id" if kind == "id" else f"{special}_token"
            if f"{special}_token_id" not in found and raw.get(field) is not None:
                found[f"{special}_token_id"] = _special_id(tok, path, field, raw[field])
    if "eos_token_id" not in found:
        found["eos_token_id"] = next((i for i in map(tok.token_to_id, EOS_CANDIDATES) if i is not None), None)
    return {f"{s}_token_id": found.get(f"{s}_token_id") for s in SPECIAL_TOKENS}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a `tokenizer.json` (GPT-NeoX for the official checkpoints),
    with the special tokens its directory names (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises bare Exceptions for unreadable files
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({e})") from e
        self._set(tok, self.path.parent)

    @classmethod
    def from_tokenizers(cls, tok, **special_ids: int | None) -> "HFTokenizer":
        """Wrap an in-memory `tokenizers.Tokenizer` (e.g. one just trained); `special_ids` (eos_token_id=...,
        bos_token_id, pad_token_id) override the eos guessed by name."""
        self = cls.__new__(cls)
        self.path = None
        self._set(tok, None, **special_ids)
        return self

    def _set(self, tok, directory: Path | None, **special_ids: int | None) -> None:
        unknown = sorted(set(special_ids) - {f"{s}_token_id" for s in SPECIAL_TOKENS})
        if unknown:
            raise TypeError(f"special token ids: unknown {unknown}; accepted: eos_token_id, bos_token_id, pad_token_id")
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = {**special_token_ids(tok, directory), **special_ids}
        self.eos_token_id, self.bos_token_id, self.pad_token_id = (ids[f"{s}_token_id"] for s in SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and a tokenizer_config.json naming the special tokens (the loaded one's other
        fields kept), so that both mambakit and transformers' AutoTokenizer read them back."""
        directory = Path(directory)
        source = self.path.parent / TOKENIZER_CONFIG_FILE if self.path is not None else None
        config = read_json_object(source) if source is not None and source.is_file() else {}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for special in SPECIAL_TOKENS:
            token_id = getattr(self, f"{special}_token_id")
            config[f"{special}_token"] = None if token_id is None else self._tok.id_to_token(token_id)
        with atomic_path(directory / HF_TOKENIZER_FILE) as tmp:
            self._tok.save(str(tmp))
        write_json(directory / TOKENIZER_CONFIG_FILE, config)


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a tokenizer that `load_tokenizer` reads."""
    return any((Path(directory) / name).is_file() for name in (HF_TOKENIZER_FILE, BYTE_TOKENIZER_FILE))


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
