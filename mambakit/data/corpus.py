"""Text corpora: which files a `--data` argument means, read in bounded pieces.

The embedded default corpus is the Python standard library's own source files: tens of MB of real
text that every machine running mambakit already has, so the demo needs no download.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tex", ".html", ".c", ".h", ".js")
# Large files are read in pieces of about this many characters, cut at a newline, so no file is held whole.
PIECE_CHARS = 1 << 22


def default_corpus_files() -> list[Path]:
    """The standard library's `*.py` files (installed packages excluded), in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def corpus_files(paths: Sequence[str | os.PathLike] | None, suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Path]:
    """The text files named by `paths` (files, or folders searched recursively for `suffixes`), sorted.

    `None`, an empty list or the word "default" gives the embedded default corpus.
    """
    if not paths or [str(p) for p in paths] == ["default"]:
        return default_corpus_files()
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        else:
            raise FileNotFoundError(f"data: no file or folder {p}")
    if not files:
        raise ValueError(f"data: no text files ({', '.join(suffixes)}) under {[str(p) for p in paths]}")
    return files


def read_pieces(path: Path, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The text of `path` in pieces of about `piece_chars` characters, each ending at a newline
    (undecodable bytes replaced), so that a file of any size streams through bounded memory."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        carry = ""
        while True:
            block = f.read(piece_chars)
            if not block:
                break
            block = carry + block
            cut = block.rfind("\n") + 1
            if cut == 0 and len(block) < 4 * piece_chars:
                carry = block  # no newline yet: keep reading, within a bound
                continue
            cut = cut or len(block)
            carry = block[cut:]
            yield block[:cut]
        if carry:
            yield carry
