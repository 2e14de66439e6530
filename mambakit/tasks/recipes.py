"""How each synthetic task is trained unless told otherwise: the defaults of `mambakit synth <task>` and of
`benchmarks/synth_tasks.py run --recipe`, with the results they were chosen by in
`benchmarks/results/synth-*-notes.md`.

    recipe = RECIPES["selective-copying"]
    model = task_model("mamba", task.vocab_size, ssm_options=recipe.ssm_options("mamba"))
    train_task(model, task, **recipe.train_options())
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Mamba-1's dt initialisation for the synthetic tasks: dt_proj's weights start 20x wider (an official `Mamba`
# argument), so that dt depends on the token from the first step, and dt starts in [1e-4, 1e-2]. Induction
# heads are learned in ~2,000 steps instead of ~4,000 and the memory holds to 2^20 (synth-cpu-notes.md).
MAMBA_DT_RECIPE = {"dt_min": 1e-4, "dt_max": 1e-2, "dt_init_floor": 1e-5, "dt_scale": 20.0}


@dataclass(frozen=True)
class Recipe:
    """`train_task` settings of a task: `curriculum` stages of (length, steps[, batch]) first, then
    `seq_len` for the rest of `steps`, Adam at `lr` (constant unless min_lr_ratio < 1), gradients clipped to
    norm `grad_clip` (None: not clipped). Mamba-1 models also take `mamba_ssm_options`; other mixers keep
    their defaults."""

    seq_len: int
    steps: int
    batch_size: int
    curriculum: tuple[tuple[int, ...], ...] = ()
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    grad_clip: float | None = None
    mamba_ssm_options: dict = field(default_factory=lambda: dict(MAMBA_DT_RECIPE))

    def ssm_options(self, arch: str) -> dict:
        """The mixer arguments of an `arch` model ("mamba" is Mamba-1; the others take none)."""
        return dict(self.mamba_ssm_options) if arch == "mamba" else {}

    def train_options(self) -> dict:
        """The `train_task` keywords of this recipe."""
        return {"seq_len": self.seq_len, "steps": self.steps, "batch_size": self.batch_size,
                "curriculum": [tuple(stage) for stage in self.curriculum], "lr": self.lr,
                "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio, "grad_clip": self.grad_clip}


RECIPES = {
    # Mamba Table 2: trained at 256 in batches of 64 (learned by step ~1,000 on the GPU, where batch 8 left one
    # seed at chance for 5,000 steps), then 500 steps at 4096 meant to make the memory last to 2^20 for every
    # seed: on an H200, 100% from 2^9 to 2^20 for 4 of 5 seeds, 75% at 2^20 for the fifth (synth-h200-notes.md).
    "induction-heads": Recipe(seq_len=4096, steps=2500, batch_size=8, curriculum=((256, 2000, 64),)),
    # Mamba Table 1 (length 4096): the copying is learned at 256 in batches of 128, then carried to 4096 by
    # doubling the length (a 16x jump, 64 -> 1024, lost what had been learned on the CPU: synth-cpu-notes.md);
    # clipping and a cosine decay keep training from the collapses a constant lr had (synth-h200-notes.md). On an
    # H100: 99.7 / 100.0 / 99.9% at 4096 for seeds 0-2, each run stopped by its 373 s bound at ~14,230 steps
    # (1,230 at 4096), six runs sharing the GPU; lr 1e-3 gave 95.8-97.4% (synth-h100-notes.md).
    "selective-copying": Recipe(seq_len=4096, steps=15000, batch_size=16, lr=2e-3, warmup_steps=500,
                                min_lr_ratio=0.1, grad_clip=1.0,
                                curriculum=((256, 10000, 128), (512, 1000, 64), (1024, 1000, 32), (2048, 1000, 16))),
    # Not tuned yet: the earlier defaults of `mambakit synth`.
    "mqar": Recipe(seq_len=256, steps=2000, batch_size=64, mamba_ssm_options={}),
}
