"""A run folder's lock: one process at a time trains into (or replaces) a run folder.

<run>/.lock is held with an advisory `flock` for as long as the owner runs, and names the owner's
pid and host for the message another process gets. The kernel drops the lock when its owner dies,
however it dies, so a lock file left by a killed run is stale and simply taken over.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected against each other there
    fcntl = None

LOCK_FILE = ".lock"


class RunLock:
    """The lock of `run_dir`; `acquire()` raises FileExistsError naming the owner while another process holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created = False  # whether acquire() created run_dir (so that discard() may remove it)

    def acquire(self) -> "RunLock":
        if self._fd is not None or fcntl is None:
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"out: {self.run_dir} is a file, expected a run folder")
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"out: cannot create the run folder {self.run_dir} ({err.strerror})") from None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 256).decode(errors="replace").strip()
            os.close(fd)
            if owner.split(" ")[0] == str(os.getpid()) and owner.endswith(socket.gethostname()):
                return self  # this process holds it already (e.g. `demo` around its Trainer)
            raise FileExistsError(f"out: {self.run_dir} is in use by another run (process {owner or 'unknown'}, "
                                  f"lock {self.path}); wait for it to end or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a process opening it)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def discard(self) -> None:
        """Release, and remove run_dir when acquire() created it and nothing but the lock file was written
        (a command that failed before doing anything leaves no folder behind)."""
        held = self._fd is not None
        self.release()
        if held and self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self.run_dir.rmdir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.release()
        else:
            self.discard()
