"""Training metrics: one JSON object per line in <run>/metrics.jsonl, and a loss-curve plot."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mambakit._io import atomic_path, pyplot, write_png

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends records to <run_dir>/metrics.jsonl (rank 0 only writes)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run rewrites the steps lost since its checkpoint."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.records() if r["step"] <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def bits_per_byte(loss_nats: float, num_tokens: int, num_bytes: int) -> float:
    """Bits per UTF-8 byte of text, from a mean loss in nats per token over `num_tokens` tokens."""
    return loss_nats * num_tokens / max(1, num_bytes) / math.log(2)


def plot_losses(records: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Training and validation loss against tokens seen, written atomically as a PNG."""
    plt = pyplot()
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5, ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_png(fig, path)
