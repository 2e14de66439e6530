"""Atomic file writes: a reader sees the old file or the new one, never half of either."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (mkstemp's 0600 would survive the rename)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_out_of_space(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a full disk (ENOSPC, also as a library's message)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left on device" in str(err).lower():
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def out_of_space_names(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full-disk error inside the block as OSError(ENOSPC) naming `path`."""
    try:
        yield
    except Exception as err:
        if is_out_of_space(err):
            raise OSError(errno.ENOSPC, "no space left on device while writing", str(path)) from err
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path` with the
    mode a new file would get. A full disk is reported as OSError(ENOSPC) naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with out_of_space_names(path):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def pyplot():
    """matplotlib.pyplot on its file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_png(fig, path: str | os.PathLike) -> None:
    """Save the matplotlib figure `fig` as a PNG at `path`, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)


def read_json_object(path: Path, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object in the file at `path`; `error` (a ValueError) naming the file when it is not valid
    JSON or not an object."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw
