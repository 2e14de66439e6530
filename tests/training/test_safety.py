"""Nothing a user saved is lost: run-folder locks, resuming past an incomplete newest checkpoint,
stopping on a non-finite loss without saving it, a full disk named as such, files with the umask's mode."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambakit._io import atomic_path, default_file_mode, write_json
from mambakit.training import Trainer, TrainingDiverged
from mambakit.training import checkpoint as ckpt
from mambakit.training.lock import RunLock

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
HOLD_LOCK = "import sys, time; from mambakit.training.lock import RunLock; RunLock(sys.argv[1]).acquire(); " \
            "print('held', flush=True); time.sleep(120)"


def finite(folder: Path) -> bool:
    from mambakit.models.checkpoint import read_state_dict

    return all(t.isfinite().all() for t in read_state_dict(folder).values() if t.is_floating_point())


def test_a_locked_run_folder_is_refused_and_a_dead_owners_lock_is_taken_over(corpus, tmp_path):
    run = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert owner.stdout.readline() == b"held\n"
        with pytest.raises(FileExistsError, match=rf"in use by another run \(process {owner.pid} "):
            Trainer(tiny_config(corpus), run, quiet=True)
        assert not (run / "train_config.json").exists()  # refused before writing anything
    finally:
        owner.kill()
        owner.wait()
    assert str(owner.pid) in (run / ".lock").read_text()  # the dead owner's lock file is still there: stale
    Trainer(tiny_config(corpus, max_tokens=4 * 32 * 2), run, quiet=True).fit()
    assert ckpt.latest_checkpoint(run) is not None
    with RunLock(run):  # fit released the folder
        pass


@pytest.mark.parametrize("victim", ["model.safetensors", ckpt.STATE_FILE])
def test_resume_falls_back_past_a_truncated_newest_checkpoint(corpus, tmp_path, victim):
    run = tmp_path / "run"
    Trainer(tiny_config(corpus, save_interval=2, keep_last=0), run, quiet=True).fit()
    assert [p.name for p in ckpt.list_checkpoints(run)][-2:] == ["checkpoint-00000004", "checkpoint-00000006"]
    path = ckpt.checkpoint_dir(run, 6) / victim
    data = path.read_bytes()
    path.write_bytes(data[:random.randrange(1, len(data))])  # a disk that filled up, a copy cut short
    warnings = []
    assert ckpt.resumable_checkpoint(run, warn=warnings.append) == ckpt.checkpoint_dir(run, 4)
    assert len(warnings) == 1 and victim in warnings[0] and "checkpoint-00000006" in warnings[0]
    resumed = Trainer.resume(run, quiet=True)
    assert resumed.step == 4
    assert resumed.fit()["step"] == 6 and ckpt.checkpoint_problem(ckpt.checkpoint_dir(run, 6)) is None


def test_resume_without_any_complete_checkpoint_says_why(corpus, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(corpus, max_tokens=4 * 32 * 3), run, quiet=True).fit()
    (ckpt.checkpoint_dir(run, 3) / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*checkpoint-00000003"):
        Trainer.resume(run, quiet=True)
    with pytest.raises(FileNotFoundError, match="no run folder"):
        Trainer.resume(tmp_path / "nowhere", quiet=True)


@pytest.mark.parametrize("patience", [1, 3])
def test_a_non_finite_loss_stops_after_patience_keeping_the_last_finite_checkpoint(corpus, tmp_path, patience):
    run = tmp_path / "run"
    poisoned_after = random.choice([4, 8])  # a checkpoint step; the next save comes after the patience ran out
    trainer = Trainer(tiny_config(corpus, max_tokens=4 * 32 * 20, save_interval=poisoned_after, keep_last=0,
                                  nonfinite_patience=patience, log_interval=1), run, quiet=True)
    original_step = trainer.train_step

    def step():  # a weight turns NaN once `poisoned_after` steps are saved: every later loss is NaN
        if trainer.step == poisoned_after:
            with torch.no_grad():
                trainer.model.backbone.norm_f.weight[random.randrange(32)] = float("nan")
        return original_step()

    trainer.train_step = step
    with pytest.raises(TrainingDiverged, match=rf"by step {poisoned_after + patience}\b.*"
                                               rf"checkpoint-{poisoned_after:08d}"):
        trainer.fit()
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, poisoned_after)
    assert all(finite(folder) for folder in ckpt.list_checkpoints(run))


def test_a_model_with_non_finite_weights_is_never_saved(corpus, tmp_path):
    trainer = Trainer(tiny_config(corpus, nonfinite_patience=1000), tmp_path / "run", quiet=True)
    with torch.no_grad():
        trainer.model.backbone.layers[0].mixer.in_proj.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="weights"):
        trainer.save()
    assert ckpt.list_checkpoints(tmp_path / "run") == []


def test_a_full_disk_is_named_and_earlier_files_stay(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    ckpt.write_checkpoint(tmp_path, 1, lambda folder: ckpt.save_trainer_state(folder, {"step": 1}))

    def fill_disk(folder):
        with open("/dev/full", "wb") as full:  # a real device answering every write with ENOSPC
            full.write(os.urandom(1 << 16))
            full.flush()

    with pytest.raises(OSError, match="no space left on device while writing") as info:
        ckpt.write_checkpoint(tmp_path, 2, fill_disk)
    assert info.value.filename == str(ckpt.checkpoint_dir(tmp_path, 2))
    assert ckpt.list_checkpoints(tmp_path) == [ckpt.checkpoint_dir(tmp_path, 1)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")] == []  # space given back

    target = tmp_path / "metrics.json"
    write_json(target, {"kept": True})
    with pytest.raises(OSError, match="no space left") as info, atomic_path(target):
        fill_disk(None)
    assert info.value.filename == str(target) and "kept" in target.read_text()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": random.random()})
        ckpt.save_trainer_state(tmp_path, {"x": torch.randn(2)})
        assert default_file_mode() == 0o666 & ~umask
    finally:
        os.umask(old)
    for name in ("a.json", ckpt.STATE_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_resume_refuses_changes_to_what_defines_the_run(corpus, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(corpus, max_tokens=4 * 32 * 2, max_time=1000.0), run, quiet=True).fit()
    for field, value in [("seq_len", 64), ("data", [str(tmp_path)]), ("d_model", 64)]:
        with pytest.raises(ValueError, match=rf"^{field}: the run in .* was trained with"):
            Trainer.resume(run, quiet=True, **{field: value})
    same_data = [str(p) + "/" for p in tiny_config(corpus).data]  # spelt differently, the same folder
    resumed = Trainer.resume(run, quiet=True, max_tokens=4 * 32 * 3, seq_len=32, eval_interval=7, data=same_data)
    assert resumed.config.max_tokens == 4 * 32 * 3 and resumed.config.eval_interval == 7
    assert resumed.config.max_time is None  # the earlier invocation's time limit is not this one's
    resumed.close()


def test_demo_overwrite_never_touches_a_folder_another_process_trains_into(tmp_path, capsys):
    from mambakit.cli import main

    run = tmp_path / "busy"
    (run / "checkpoint-00000010").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    owner = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert owner.stdout.readline() == b"held\n"
        assert main(["demo", "--out", str(run), "--overwrite"]) == 2
    finally:
        owner.kill()
        owner.wait()
    assert f"process {owner.pid} " in capsys.readouterr().err
    assert (run / "checkpoint-00000010").is_dir() and (run / "metrics.jsonl").read_text() == '{"step": 10}\n'
