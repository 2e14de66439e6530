"""Text corpora: which files a `--data` argument means, read in bounded pieces.

The embedded default corpus is the Python standard library's own source files: tens of MB of real
text that every machine running mambakit already has, so the demo needs no download.
"""
from __future__ import annotations

import codecs
import fnmatch
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

# Large files are read in pieces of about this many characters, cut at a newline, so no file is held whole.
PIECE_CHARS = 1 << 22
_CHECK_BYTES = 1 << 20  # files are checked for being text in blocks of this size


@dataclass
class Corpus:
    """The files a `--data` argument selects, and those it passed over: {reason: [files]}."""

    files: list[Path]
    skipped: dict[str, list[Path]] = field(default_factory=dict)

    def skipped_counts(self) -> str:
        """'3: 1 binary, 2 not UTF-8' ('0' when none was skipped)."""
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(self.skipped.items()))
        return f"{sum(map(len, self.skipped.values()))}" + (f": {counts}" if counts else "")

    def describe(self) -> str:
        """'42 files (skipped 3: 1 binary, 2 not UTF-8)'."""
        return f"{len(self.files)} files" + (f" (skipped {self.skipped_counts()})" if self.skipped else "")


def default_corpus_files() -> list[Path]:
    """The standard library's `*.py` files (installed packages excluded), in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def text_problem(path: Path) -> str | None:
    """Why `path` is not text to train on ("binary", "not UTF-8", "unreadable"), or None. Reads the whole
    file in bounded blocks: a Latin-1 or binary file must not reach the tokenizer as U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(_CHECK_BYTES):
                if b"\0" in block:
                    return "binary"
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8"
    except OSError:
        return "unreadable"
    return None


def select_corpus(paths: Sequence[str | os.PathLike] | None, include: Sequence[str] = (),
                  exclude: Sequence[str] = ()) -> Corpus:
    """The text files named by `paths`, sorted: files as given, folders searched recursively.

    In a folder, a file is taken when its content is UTF-8 text without NUL bytes (whatever its name),
    it is not hidden (no part of its path starts with "."), it matches one of the `include` globs if any
    and none of the `exclude` globs (shell patterns on the path relative to the folder, e.g. "*.py",
    "docs/*"). A file named directly must be text. `None`, [] or ["default"]: the embedded corpus.
    """
    if not paths or [str(p) for p in paths] == ["default"]:
        corpus = Corpus([])
        for f in default_corpus_files():
            _take(corpus, f, text_problem(f))
        return corpus
    corpus = Corpus([])
    for p in map(Path, paths):
        if p.is_file():
            problem = text_problem(p)
            if problem:
                raise ValueError(f"data: {p} is {problem}, expected UTF-8 text")
            corpus.files.append(p)
        elif p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file()):
                _take(corpus, f, _folder_file_problem(f.relative_to(p), include, exclude) or text_problem(f))
        else:
            raise FileNotFoundError(f"data: no file or folder {p}")
    if not corpus.files:
        raise ValueError(f"data: no text files under {[str(p) for p in paths]}; skipped {corpus.skipped_counts()}")
    return corpus


def corpus_files(paths: Sequence[str | os.PathLike] | None, include: Sequence[str] = (),
                 exclude: Sequence[str] = ()) -> list[Path]:
    """The files of `select_corpus(paths, include, exclude)`."""
    return select_corpus(paths, include, exclude).files


def _folder_file_problem(relative: Path, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    name = relative.as_posix()
    if any(part.startswith(".") for part in relative.parts):
        return "hidden"
    if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return "not included"
    if any(fnmatch.fnmatchcase(name, g) for g in exclude):
        return "excluded"
    return None


def _take(corpus: Corpus, path: Path, problem: str | None) -> None:
    if problem is None:
        corpus.files.append(path)
    else:
        corpus.skipped.setdefault(problem, []).append(path)


def read_pieces(path: Path, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The text of `path` in pieces of about `piece_chars` characters, each ending at a newline
    (undecodable bytes, in a file changed since `text_problem` read it, replaced), so that a file of any
    size streams through bounded memory."""
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
