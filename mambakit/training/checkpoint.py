"""Training checkpoints: folders that are also `from_pretrained` folders, written atomically.

    <run>/checkpoint-00001000/   config.json, model.safetensors   (MambaLMHeadModel.from_pretrained)
                                 tokenizer file(s)                 (mambakit.tokenizer.load_tokenizer)
                                 train_config.json                 (the run's TrainConfig)
                                 trainer_state.pt                  (optimizer, step, data position, RNG)
    <run>/latest -> checkpoint-00001000

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash mid-write
leaves the previous checkpoints as they were; `trainer_state.pt` holds only tensors and plain Python
values and loads with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import torch

from mambakit._io import atomic_path, out_of_space_names
from mambakit.models.checkpoint import CONFIG_NAME, SAFETENSORS_NAME
from mambakit.training.config import CONFIG_FILE

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
LATEST_LINK = "latest"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX}(\d+)$")
# Optimizer options that describe this machine's kernels, not the optimisation: the resuming run's own win.
_DEVICE_OPTIONS = ("fused", "foreach", "capturable")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes excluded)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from (a file missing, truncated or unreadable), or None.
    Reads only headers and small files, so it is cheap even for large checkpoints."""
    from safetensors import safe_open

    folder = Path(folder)
    for name in (CONFIG_NAME, CONFIG_FILE):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name}: {err}"
    try:  # torch.save writes a zip archive whose directory is at the end: a truncated one has none
        with zipfile.ZipFile(folder / STATE_FILE) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        return f"{STATE_FILE}: {err}"
    try:  # safetensors checks that the header's offsets cover the file
        with safe_open(str(folder / SAFETENSORS_NAME), "pt") as weights:
            weights.keys()
    except Exception as err:  # SafetensorError has no public base class to name here
        return f"{SAFETENSORS_NAME}: {err}"
    return None


def resumable_checkpoint(run_dir: str | os.PathLike, warn=print) -> Path:
    """The newest checkpoint of `run_dir` whose files are complete; `warn(text)` hears of each newer one skipped."""
    skipped = []
    for folder in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        skipped.append(f"{folder.name} ({problem})")
        warn(f"resume: skipping the incomplete {folder.name}: {problem}")
    detail = f"; incomplete: {', '.join(skipped)}" if skipped else ""
    raise FileNotFoundError(f"resume: no complete checkpoint in {run_dir}{detail}")


def rng_state() -> dict:
    """Every random generator a training step may draw from (Python, torch CPU, each CUDA device)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(run_dir: str | os.PathLike, step: int, write_files, keep_last: int | None = None) -> Path:
    """Create checkpoint `step` of `run_dir` atomically: `write_files(folder)` fills a temporary folder,
    which is then renamed into place; `latest` is pointed at it and all but the `keep_last` newest go
    (0 or None: all are kept)."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError(f"keep_last: expected an int >= 0 (0 keeps all), got {keep_last!r}")
    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir, step)
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with out_of_space_names(final):
            write_files(tmp)
            _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # give a full disk its space back; earlier checkpoints stay
        raise
    if final.exists():  # the same step written again (e.g. an interrupted run saved it already)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_latest(run_dir, final.name)
    _fsync_dir(run_dir)
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_trainer_state(folder: Path, state: dict) -> None:
    """Write `state` (tensors and plain Python values only) to folder/trainer_state.pt."""
    with atomic_path(folder / STATE_FILE) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)  # through a Python file, so that a full disk is an OSError (ENOSPC), not a C++ message


def load_trainer_state(folder: str | os.PathLike) -> dict:
    """The trainer state of a checkpoint folder, loaded without executing code."""
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def portable_optimizer_state(optim_state: dict, current_groups: list[dict]) -> dict:
    """A saved optimizer state with the device-specific options of the current optimizer's groups, and their
    learning rate (the schedule sets it every step; a float, or a device tensor under CUDA graphs)."""
    for saved, current in zip(optim_state["param_groups"], current_groups):
        for key in _DEVICE_OPTIONS + ("lr",):
            if key in current:
                saved[key] = current[key]
    return optim_state


def remove_stale_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete temporary folders left by checkpoint writes that were killed."""
    for p in Path(run_dir).glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def _point_latest(run_dir: Path, name: str) -> None:
    link, tmp = run_dir / LATEST_LINK, run_dir / f".{LATEST_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, link)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
