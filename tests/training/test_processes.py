"""Training as separate processes: `kill -9` loses only the steps since the last checkpoint, and a
2-process gloo run (torchrun; DDP or FSDP2) equals a 1-process run with the same global batch."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mambakit.training import Trainer
from mambakit.training import checkpoint as ckpt

from .conftest import assert_same_adam_trajectory, tiny_config

REPO = Path(__file__).resolve().parents[2]


def cli_args(config) -> list[str]:
    return ["--data", *config.data, "--arch", config.arch, "--d-model", str(config.d_model), "--n-layer",
            str(config.n_layer), "--d-state", str(config.d_state), "--headdim", str(config.headdim),
            "--seq-len", str(config.seq_len), "--batch-size", str(config.batch_size), "--max-tokens",
            str(config.max_tokens), "--lr", str(config.lr), "--warmup-fraction", str(config.warmup_fraction),
            "--log-interval", "1", "--eval-interval", str(config.eval_interval), "--eval-sequences",
            str(config.eval_sequences), "--save-interval", str(config.save_interval), "--device", "cpu",
            "--val-fraction", str(config.val_fraction), "--quiet"]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def records(run_dir: Path) -> list[dict]:
    """Complete lines of the run's metrics (the trainer may be appending one while we read)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def start_training(run: Path, config, until_step: int, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """`mambakit train` in a child process, returned once it has logged `until_step` (or exited, or 120 s passed)."""
    proc = subprocess.Popen([sys.executable, "-m", "mambakit", "train", "--out", str(run), *cli_args(config)],
                            env=child_env(), stdout=stdout, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while max(losses(run), default=0) < until_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(corpus, tmp_path):
    config = tiny_config(corpus, max_tokens=4 * 32 * 8, save_interval=3, eval_interval=100)
    Trainer(config, tmp_path / "reference", quiet=True).fit()
    expected = losses(tmp_path / "reference")

    run = tmp_path / "killed"
    proc = start_training(run, config, until_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = max(losses(run))
    assert 4 <= logged < 8, proc.stderr.read().decode()[-2000:]
    # The last checkpoint before the kill survives (or the one before it, when the kill hit its write).
    saved = logged // 3 * 3
    latest = ckpt.latest_checkpoint(run)
    assert latest in (ckpt.checkpoint_dir(run, saved), ckpt.checkpoint_dir(run, saved - 3))

    resumed = Trainer.resume(run, quiet=True)
    assert ckpt.checkpoint_dir(run, resumed.step) == latest
    resumed.fit()
    got = losses(run)
    assert sorted(got) == list(range(1, 9))  # steps after the checkpoint were redone, once each
    assert got == expected


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_and_resume_on_one(corpus, tmp_path, sharding):
    config = tiny_config(corpus, max_tokens=4 * 32 * 4, save_interval=2, eval_interval=2)
    one = Trainer(config, tmp_path / "one", quiet=True)
    one.fit()

    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "mambakit", "train", "--out", str(two)]
    extra = ["--fsdp"] if sharding == "fsdp" else []
    done = subprocess.run(torchrun + cli_args(config) + extra, env=child_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    expected, got = losses(tmp_path / "one"), losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5)
    val = lambda run: [r["val_loss"] for r in records(run) if "val_loss" in r]  # noqa: E731
    assert len(val(two)) == 2 and val(two) == pytest.approx(val(tmp_path / "one"), rel=1e-5)

    # Lose the last checkpoint; the 2-process one before it resumes on one process, same trajectory.
    shutil.rmtree(ckpt.checkpoint_dir(two, 4))
    resumed = Trainer.resume(two, quiet=True)
    assert resumed.step == 2
    resumed.fit()
    got = losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-5)
    assert_same_adam_trajectory(one.model, resumed.model, config.lr, steps=4)


def test_sigterm_saves_the_current_step_and_exits_cleanly(corpus, tmp_path):
    config = tiny_config(corpus, max_tokens=4 * 32 * 1000, save_interval=1000, eval_interval=1000)
    run = tmp_path / "stopped"
    proc = start_training(run, config, until_step=2, stdout=subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"SIGTERM" in out
    stopped_at = max(losses(run))
    assert 2 <= stopped_at < 1000
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, stopped_at)
    assert Trainer.resume(run, quiet=True).step == stopped_at
