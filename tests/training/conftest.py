"""A small random-text corpus and a tiny run configuration shared by the training tests."""
import random

import pytest
import torch

from mambakit.training import TrainConfig

WORDS = ["state", "space", "selective", "scan", "mamba", "über", "def", "return", "(", ")", "\n", "x", "=", "1"]


@pytest.fixture
def corpus(tmp_path, fresh_seed, monkeypatch):
    """A folder of a few random-text files; token files are cached under tmp_path."""
    monkeypatch.setenv("MAMBAKIT_CACHE", str(tmp_path / "cache"))
    rng = random.Random(fresh_seed)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(300, 600))))
    return folder


def tiny_config(corpus, **overrides) -> TrainConfig:
    """A Mamba-2 small enough that a step takes milliseconds on one CPU core."""
    fields = dict(data=[str(corpus)], arch="mamba2", d_model=32, n_layer=2, d_state=8, headdim=16, expand=2,
                  seq_len=32, batch_size=4, max_tokens=4 * 32 * 6, lr=3e-3, warmup_fraction=0.2, log_interval=1,
                  eval_interval=3, eval_sequences=8, save_interval=3, keep_last=2, device="cpu", val_fraction=0.1)
    return TrainConfig(**{**fields, **overrides})


def assert_same_adam_trajectory(model_a, model_b, lr: float, steps: int) -> None:
    """Parameters after the same Adam steps from gradients equal up to rounding (another reduction order or
    batch split). Adam moves a weight by about lr whatever its gradient, so the rare weight whose gradient is
    ~0 may differ by a sizeable fraction of lr (each update at most a few lr); all but 0.1% within 1% of lr."""
    a = torch.cat([p.detach().flatten() for p in model_a.parameters()])
    b = torch.cat([p.detach().flatten() for p in model_b.parameters()])
    diff = (a - b).abs()
    assert diff.max().item() <= 8 * lr * steps
    assert (diff > 0.01 * lr).float().mean().item() <= 1e-3
