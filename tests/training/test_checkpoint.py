"""Checkpoint folders: atomic creation, keep-last-k, state that loads with weights_only=True."""
import random

import pytest
import torch

from mambakit.training import checkpoint as ckpt


def write_marker(value):
    def write(folder):
        (folder / "value.txt").write_text(str(value))
        ckpt.save_trainer_state(folder, {"step": value, "weights": torch.randn(3)})
    return write


def test_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    ckpt.write_checkpoint(tmp_path, 5, write_marker(5))

    def crash(folder):
        write_marker(10)(folder)
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 10, crash)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest == ckpt.checkpoint_dir(tmp_path, 5)
    assert (tmp_path / "latest").resolve() == latest.resolve()
    assert ckpt.load_trainer_state(latest)["step"] == 5
    ckpt.remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_keep_last_removes_only_the_oldest(tmp_path):
    for step in (2, 4, 6, 8):
        ckpt.write_checkpoint(tmp_path, step, write_marker(step), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-00000006", "checkpoint-00000008"]
    assert (tmp_path / "latest" / "value.txt").read_text() == "8"


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    ckpt.save_trainer_state(tmp_path, {"rng": ckpt.rng_state()})
    expected = (torch.rand(4), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / ckpt.STATE_FILE, weights_only=True)["rng"])
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]


@pytest.mark.parametrize("keep_last", [0, None])
def test_keep_last_zero_keeps_every_checkpoint(tmp_path, keep_last):
    steps = random.sample(range(1, 100), 4)
    for step in sorted(steps):
        ckpt.write_checkpoint(tmp_path, step, write_marker(step), keep_last=keep_last)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_dir(tmp_path, s).name
                                                                 for s in sorted(steps)]


@pytest.mark.parametrize("keep_last", [-1, -3, 1.5, True])
def test_keep_last_refuses_values_that_would_delete_new_checkpoints(tmp_path, keep_last):
    ckpt.write_checkpoint(tmp_path, 1, write_marker(1))
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.write_checkpoint(tmp_path, 2, write_marker(2), keep_last=keep_last)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-00000001"]
