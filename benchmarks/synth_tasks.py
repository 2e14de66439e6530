"""Synthetic tasks of the Mamba paper, measured: induction heads (Table 2: 2 layers, d_model 64, trained at
length 256, accuracy at 2^6 .. 2^20) for Mamba and a same-size attention model, and selective copying
(Table 1: length 4096, 16 tokens, vocab 16) for Mamba. Each model trains for a wall-clock budget.

    python benchmarks/synth_tasks.py --induction-time 60 --attention-time 20 --copying-time 45

Writes synth-<device>.json and synth-<device>.png to --out (benchmarks/results) and prints a table last.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mambakit._io import write_json
from mambakit.bench.common import device_slug, environment
from mambakit.cli.synth import format_table, parse_lengths, plot_accuracy
from mambakit.tasks import InductionHeads, SelectiveCopying
from mambakit.tasks.train import accuracy, task_model, train_task


def measure(task, arch: str, train_len: int, lengths: list[int], seconds: float, args, max_len: int | None = None,
            **model_options) -> dict:
    """Train `arch` on `task` for `seconds` (at most args.steps steps), then accuracy at each length."""
    torch.manual_seed(args.seed)
    model = task_model(arch, task.vocab_size, args.d_model, 2, device=args.device, **model_options)
    start = time.perf_counter()
    log = train_task(model, task, train_len, args.steps, args.batch_size, args.lr, seed=args.seed,
                     max_time=seconds, progress=False, log_interval=250)
    train_s = time.perf_counter() - start
    acc, eval_s = {}, {}
    for n in lengths:
        if max_len is not None and n > max_len:
            acc[n] = None
            continue
        start = time.perf_counter()
        samples = args.eval_samples if n <= 1 << 16 else args.long_eval_samples
        try:
            acc[n] = accuracy(model, task, n, samples, batch_size=64, seed=args.seed + 1)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            acc[n] = None
        eval_s[n] = round(time.perf_counter() - start, 2)
    row = {"task": task.name, "arch": arch, "params": sum(p.numel() for p in model.parameters()),
           "train_len": train_len, "steps": log[-1]["step"], "train_s": round(train_s, 1),
           "final_loss": log[-1]["loss"], "final_train_acc": log[-1]["train_acc"], "accuracy": acc,
           "eval_s": eval_s, "model_options": model_options, "log": log}
    print(f"{task.name} {arch}: {row['steps']} steps in {row['train_s']} s, loss {row['final_loss']:.4f}; "
          + ", ".join(f"{n}: {'-' if a is None else f'{100 * a:.1f}'}" for n, a in acc.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--induction-time", type=float, default=60.0, help="seconds of training for Mamba")
    parser.add_argument("--attention-time", type=float, default=20.0, help="seconds for the attention model")
    parser.add_argument("--copying-time", type=float, default=45.0, help="seconds for selective copying")
    parser.add_argument("--induction-arch", default="mamba")
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("64,...,1048576"))
    parser.add_argument("--max-attention-len", type=int, default=1 << 14, help="the paper's attention ran out of memory past 2^14")
    parser.add_argument("--copying-len", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100_000, help="cap on steps (the time budget usually ends first)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--copying-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--long-eval-samples", type=int, default=8, help="sequences per length past 2^16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    induction = InductionHeads()
    rows = [measure(induction, args.induction_arch, 256, args.lengths, args.induction_time, args)]
    rows.append(measure(induction, "transformer", 256, args.lengths, args.attention_time, args,
                        max_len=args.max_attention_len, d_intermediate=0))
    copying = SelectiveCopying()
    saved_batch, args.batch_size = args.batch_size, args.copying_batch_size
    rows.append(measure(copying, args.induction_arch, args.copying_len, [args.copying_len], args.copying_time, args))
    args.batch_size = saved_batch

    slug = device_slug()
    write_json(args.out / f"synth-{slug}.json", {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
                                                 "rows": rows})
    plot_accuracy(rows[:2], args.lengths, 256, args.out / f"synth-{slug}.png", "induction heads (trained at 256)")
    print("\ninduction heads, accuracy (%) by length (trained at 256; '-': not run)")
    print(format_table(rows[:2], args.lengths))
    print(f"\nselective copying (length {args.copying_len}): {100 * rows[2]['accuracy'][args.copying_len]:.1f}% "
          f"after {rows[2]['steps']} steps ({rows[2]['train_s']} s)")


if __name__ == "__main__":
    main()
