"""Multi-GPU training on one host (torchrun + NCCL): scaling and exactness of `mambakit train`.

    python benchmarks/multigpu.py --gpus 2                      # the 370M-shape runs, bf16, seq 2048
    python benchmarks/multigpu.py --gpus 2 --device cpu --d-model 64 --n-layer 2 --seq-len 64   # a gloo rehearsal

For each architecture: a 1-process run, an N-process DDP run and an N-process FSDP2 run, all with the
same global batch and seed; then the N-process DDP run's mid-point checkpoint is resumed on 1 and on
N processes. Reports tokens/s per GPU (median over steps after warm-up), the largest per-step loss
difference against the 1-process run, and whether resumed runs continue the same loss curve.
Rows go to benchmarks/results/multigpu-<gpu>.json; a table is printed last. Runs are skipped, not
cut, once --time-budget seconds have passed, so partial results are still written.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mambakit.bench.common import device_slug, format_table, save_rows
from mambakit.training.checkpoint import list_checkpoints
from mambakit.training.metrics import MetricsLog

# NVLink multicast must stay off on shared hosts (device README): set for every child process.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
WARMUP_STEPS = 5
COLUMNS = ["arch", "run", "procs", "steps", "tok_s_per_gpu", "scaling", "max_loss_diff"]


def train(args, out: Path, procs: int, arch: str, fsdp: bool = False, resume: bool = False) -> list[dict]:
    """Run `mambakit train` under torchrun; returns the per-step metrics lines it appended."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "mambakit", "train", "--quiet"]
    if resume:
        cmd += ["--resume", str(out)]
    else:
        tokens = args.steps * args.batch * args.seq_len
        cmd += ["--out", str(out), "--arch", arch, "--d-model", str(args.d_model), "--n-layer", str(args.n_layer),
                "--seq-len", str(args.seq_len), "--batch-size", str(args.batch),
                "--micro-batch-size", str(args.micro_batch), "--max-tokens", str(tokens),
                "--device", args.device, "--log-interval", "1", "--eval-interval", str(10 * args.steps),
                "--save-interval", str(args.steps // 2), "--keep-last", "3", "--lr", "3e-4",
                "--warmup-fraction", "0.1", "--fsdp" if fsdp else "--no-fsdp"]
    env = {**os.environ, **NCCL_SAFE_ENV, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)
    return MetricsLog(out).records()


def step_losses(lines: list[dict]) -> dict[int, float]:
    """Training loss of each optimizer step (validation lines carry no 'loss')."""
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def max_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) for s in steps)


def summarize(arch, run, procs, lines, base_losses=None, base_rate=None, steps=None) -> dict:
    losses = step_losses(lines)
    row = {"arch": arch, "run": run, "procs": procs, "steps": max(losses)}
    # A resumed run's metrics start with the copied rows: its rate would mix two runs.
    rates = [r["tok_per_s"] for r in lines if r.get("step", 0) > WARMUP_STEPS and "tok_per_s" in r]
    if rates and steps is None:
        row["tok_s_per_gpu"] = statistics.median(rates) / procs
        if base_rate:
            row["scaling"] = row["tok_s_per_gpu"] / base_rate
    if base_losses is not None:
        compared = steps or sorted(set(losses) & set(base_losses))
        row["max_loss_diff"] = max_diff(losses, base_losses, compared)
        row["compared_steps"] = f"{min(compared)}-{max(compared)}"
    return row


def rewind(run: Path, step: int, dst: Path) -> Path:
    """A copy of `run` without the checkpoints after `step`: `--resume` continues from `step`'s (the
    newest left) and drops the metrics of later steps itself."""
    shutil.copytree(run, dst, symlinks=True)
    for ckpt in list_checkpoints(dst):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="processes of the multi-process runs")
    p.add_argument("--archs", default="mamba2,mamba")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per process and forward")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", type=Path, default=Path("/tmp/mambakit-multigpu"))
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; later runs are skipped")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    start, rows, n = time.monotonic(), [], args.gpus
    mid = args.steps // 2

    def have_time() -> bool:
        return time.monotonic() - start < args.time_budget

    for arch in args.archs.split(","):
        if not have_time():
            break
        base = train(args, args.work / f"{arch}-1", 1, arch)
        rows.append(summarize(arch, "1 process", 1, base))
        base_losses, base_rate = step_losses(base), rows[-1].get("tok_s_per_gpu")
        for fsdp in (False, True):
            if not have_time():
                break
            name = "fsdp2" if fsdp else "ddp"
            lines = train(args, args.work / f"{arch}-{n}-{name}", n, arch, fsdp=fsdp)
            rows.append(summarize(arch, f"{n}x {name}", n, lines, base_losses, base_rate))
        for procs in (1, n):
            if not have_time() or not (args.work / f"{arch}-{n}-ddp").exists():
                break
            resumed = rewind(args.work / f"{arch}-{n}-ddp", mid, args.work / f"{arch}-resume-{procs}")
            lines = train(args, resumed, procs, arch, resume=True)
            uninterrupted = step_losses(MetricsLog(args.work / f"{arch}-{n}-ddp").records())
            rows.append(summarize(arch, f"{n}x ddp @{mid} resumed on {procs}", procs, lines, uninterrupted, None,
                                  steps=range(mid + 1, args.steps + 1)))
        save_rows(args.out / f"multigpu-{device_slug()}.json", rows)
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
