"""Synthetic tasks of the Mamba paper, measured: induction heads (Table 2: 2 layers, d_model 64, trained at
length 256, accuracy at 2^6 .. 2^20; Mamba against a same-size attention model) and selective copying
(Table 1: length 4096, 16 tokens, vocab 16). Each model trains for a wall-clock budget, one model per
process, so that several small models can share a GPU side by side:

    python benchmarks/synth_tasks.py run --task induction-heads --arch mamba --time 150 --tag ih-mamba
    python benchmarks/synth_tasks.py run --task induction-heads --arch transformer --time 60 --tag ih-attention \\
        --max-len 16384 --model-options '{"d_intermediate": 0}'
    python benchmarks/synth_tasks.py run --task selective-copying --arch mamba --train-len 4096 --batch-size 16 \\
        --lengths 4096 --time 150 --tag sc-mamba
    python benchmarks/synth_tasks.py run --task selective-copying --recipe --lengths 256,1024,4096 --time 600 \\
        --tag sc-recipe   # the recipe `mambakit synth` runs (mambakit/tasks/recipes.py) for options left out
    python benchmarks/synth_tasks.py summarize        # merges results/synth-part-*.json into synth-<device>.json

`--probe-every 2500` measures accuracy at `--probe-lens` during training, so a run also says how many steps
its extrapolation took. On a CPU, `--threads 1` lets two runs share two cores.

Each run writes <out>/synth-part-<tag>.json; summarize writes synth-<device>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mambakit._io import pyplot, write_json, write_png
from mambakit.bench.common import device_slug, environment
from mambakit.cli.synth import (add_schedule_arguments, build_task, format_table, parse_lengths, plot_accuracy,
                                 schedule_options, take_recipe)
from mambakit.tasks import TASKS
from mambakit.tasks.recipes import RECIPES, Recipe
from mambakit.tasks.train import accuracy, task_model, train_task

RESULTS = Path(__file__).parent / "results"
# Options left out without --recipe: the papers' setup (length 256, constant lr, mixer defaults), no curriculum;
# training usually ends at --time.
PLAIN = Recipe(seq_len=256, steps=1_000_000, batch_size=64, mamba_ssm_options={})


def run(args: argparse.Namespace) -> None:
    """Train one model on one task for args.time seconds, then accuracy at each length."""
    if args.threads:
        torch.set_num_threads(args.threads)
    task = build_task(args.task, args.vocab, args.num_pairs)
    torch.manual_seed(args.seed)
    # initialised on --init-device (default: --device), so that a GPU run can start from a CPU run's weights
    init_device = args.init_device or args.device
    model = task_model(args.arch, task.vocab_size, args.d_model, args.n_layer, device=init_device,
                       **args.model_options).to(args.device)
    chunk_len = args.eval_chunk or None

    def on_log(record: dict) -> None:
        """Every --probe-every steps, accuracy at the --probe-lens goes into the log: accuracy against steps."""
        if args.probe_every and record["step"] % args.probe_every == 0:
            record["probe"] = {n: accuracy(model, task, n, args.probe_samples, batch_size=64, seed=args.seed + 2,
                                           chunk_len=chunk_len) for n in args.probe_lens}
        print(args.tag, record, flush=True)

    start = time.perf_counter()
    log = train_task(model, task, args.train_len, args.steps, args.batch_size, args.lr, seed=args.seed,
                     max_time=args.time, progress=False, log_interval=250, on_log=on_log, **schedule_options(args))
    train_s = time.perf_counter() - start  # probes included
    row = {"tag": args.tag, "task": task.name, "task_config": vars(task), "arch": args.arch, "recipe": args.recipe,
           "params": sum(p.numel() for p in model.parameters()), "model_options": args.model_options,
           "seed": args.seed, "init_device": init_device,
           "d_model": args.d_model, "n_layer": args.n_layer, "train_len": args.train_len,
           "batch_size": args.batch_size, "lr": args.lr,
           **schedule_options(args),
           "steps": log[-1]["step"], "train_s": round(train_s, 1), "final_loss": log[-1]["loss"],
           "final_train_acc": log[-1]["train_acc"], "accuracy": {}, "eval_s": {}, "eval_samples": {}, "log": log}
    for n in args.lengths:  # the part file is rewritten after each length, so a timeout keeps what was measured
        samples = args.eval_samples if n <= 1 << 16 else args.long_eval_samples
        start = time.perf_counter()
        try:
            acc = None if args.max_len is not None and n > args.max_len else \
                accuracy(model, task, n, samples, batch_size=64, seed=args.seed + 1, chunk_len=chunk_len)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            acc = None
        row["accuracy"][n], row["eval_samples"][n] = acc, samples
        row["eval_s"][n] = round(time.perf_counter() - start, 2)
        print(f"{args.tag}: length {n}: {acc} ({row['eval_s'][n]} s)", flush=True)
        write_json(args.out / f"synth-part-{args.tag}.json",
                   {"environment": environment(), "device": device_slug(), "row": row})


def summarize(args: argparse.Namespace) -> None:
    """Merge the part files in args.out into synth-<device>.json (a part replaces the row of its tag, the
    file's other rows are kept) and its plots; print the tables."""
    parts = [json.loads(p.read_text()) for p in sorted(args.out.glob("synth-part-*.json"))]
    if not parts:
        raise SystemExit(f"summarize: no synth-part-*.json in {args.out}")
    slug = parts[0]["device"]
    merged = args.out / f"synth-{slug}.json"
    new_tags = {p["row"]["tag"] for p in parts}
    kept = [r for r in json.loads(merged.read_text())["rows"] if r["tag"] not in new_tags] if merged.exists() else []
    rows = kept + [p["row"] for p in parts]
    for row in rows:  # JSON keys are strings
        row["accuracy"] = dict(sorted((int(n), a) for n, a in row["accuracy"].items()))
    write_json(merged, {"environment": parts[0]["environment"], "rows": rows})
    for task in sorted({r["task"] for r in rows}):
        if task == "mqar":
            print(mqar_summary([r for r in rows if r["task"] == task], args.out / f"synth-{slug}-mqar.png"))
            continue
        task_rows = [dict(r, arch=r["tag"]) for r in rows if r["task"] == task]
        lengths = sorted({n for r in task_rows for n in r["accuracy"]})
        if len(lengths) > 1:
            plot_accuracy(task_rows, lengths, task_rows[0]["train_len"], args.out / f"synth-{slug}-{task}.png", task)
        print(f"\n{task}: accuracy (%) by length, trained at {task_rows[0]['train_len']} ('-': not run)")
        print(format_table(task_rows, lengths))
        for r in task_rows:
            print(f"  {r['tag']}: {r['steps']} steps (batch {r['batch_size']}) in {r['train_s']} s, "
                  f"final loss {r['final_loss']:.4f}")


def mqar_summary(rows: list[dict], path: Path) -> str:
    """The Mamba-2 paper's MQAR comparison from the rows: accuracy (%) at the training length for each model
    (arch and state size N) by (length, key-value pairs), as a table; and as a plot, accuracy against length
    at the most common pairs count and against pairs at the most common length."""
    plt = pyplot()

    def model(r):
        return (f"{r['arch']} N={r['model_options'].get('d_state', 'default')} d={r.get('d_model', 64)} "
                f"vocab={r['task_config']['vocab_size']}")

    def setting(r):
        return r["train_len"], r["task_config"]["num_pairs"] or r["train_len"] // 4

    acc = {(model(r), setting(r)): 100 * r["accuracy"][r["train_len"]] for r in rows
           if r["accuracy"].get(r["train_len"]) is not None}  # None: out of memory
    models, settings = sorted({m for m, _ in acc}), sorted({s for _, s in acc})
    lines = [f"\nmqar: accuracy (%) at the training length, columns length/pairs\n{'model':>33} "
             + " ".join(f"{f'{n}/{p}':>9}" for n, p in settings)]
    lines += [f"{m:>33} " + " ".join(f"{acc[m, s]:>9.1f}" if (m, s) in acc else f"{'-':>9}" for s in settings)
              for m in models]
    lengths, pairs = [n for n, _ in settings], [p for _, p in settings]
    fixed_pairs, fixed_len = max(set(pairs), key=pairs.count), max(set(lengths), key=lengths.count)
    fig, (by_len, by_pairs) = plt.subplots(1, 2, figsize=(11, 4))
    for m in models:
        for ax, keep, x in ((by_len, lambda s: s[1] == fixed_pairs, 0), (by_pairs, lambda s: s[0] == fixed_len, 1)):
            points = sorted((s[x], acc[m, s]) for s in settings if keep(s) and (m, s) in acc)
            ax.plot(*zip(*points), "o-", label=m)
    for ax, xlabel, title in ((by_len, "sequence length", f"{fixed_pairs} key-value pairs"),
                              (by_pairs, "key-value pairs", f"length {fixed_len}")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel=xlabel, ylabel="accuracy (%)", ylim=(-2, 102), title=f"MQAR, {title}")
        ax.grid(alpha=0.3)
    by_pairs.legend(fontsize="small")
    fig.tight_layout()
    write_png(fig, path)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="train and evaluate one model")
    one.add_argument("--task", choices=sorted(TASKS), default="induction-heads")
    one.add_argument("--arch", default="mamba")
    one.add_argument("--vocab", type=int, default=None, help="task vocabulary (the task's default)")
    one.add_argument("--num-pairs", type=int, default=None, help="mqar: key-value pairs (default: length / 4)")
    one.add_argument("--tag", required=True, help="names the result file")
    one.add_argument("--recipe", action="store_true", help="options left out take the task's recipe "
                     "(mambakit/tasks/recipes.py, as `mambakit synth`), not the papers' plain setup")
    one.add_argument("--time", type=float, default=60.0, help="seconds of training")
    one.add_argument("--steps", type=int, default=None, help="cap on steps (without --recipe 1,000,000: the time "
                     "budget usually ends first)")
    one.add_argument("--train-len", type=int, default=None, help="(256)")
    one.add_argument("--lengths", type=parse_lengths, default=parse_lengths("64,...,1048576"))
    one.add_argument("--max-len", type=int, default=None, help="longest length evaluated")
    one.add_argument("--d-model", type=int, default=64)
    one.add_argument("--n-layer", type=int, default=2)
    one.add_argument("--model-options", type=json.loads, default=None, help="TrainConfig model fields, JSON "
                     "(with --recipe: the recipe's mixer options)")
    one.add_argument("--batch-size", type=int, default=None, help="(64)")
    one.add_argument("--lr", type=float, default=None, help="(1e-3)")
    add_schedule_arguments(one)
    one.add_argument("--eval-samples", type=int, default=256)
    one.add_argument("--long-eval-samples", type=int, default=16, help="sequences per length past 2^16")
    one.add_argument("--eval-chunk", type=int, default=1 << 16, help="longer sequences are evaluated in chunks of "
                     "this many tokens through the inference cache (bounded memory; 0: whole sequences)")
    one.add_argument("--probe-every", type=int, default=0, help="steps between accuracy probes during training "
                     "(a multiple of 250; 0: none)")
    one.add_argument("--probe-lens", type=parse_lengths, default=parse_lengths("256,4096,16384"))
    one.add_argument("--probe-samples", type=int, default=32)
    one.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    one.add_argument("--init-device", default=None, help="device whose random generator initialises the "
                     "model (cpu: the same weights as a CPU run of the same seed)")
    one.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    one.add_argument("--seed", type=int, default=0)
    one.set_defaults(func=run)
    merge = sub.add_parser("summarize", help="merge part files and print the tables")
    merge.set_defaults(func=summarize)
    for p in (one, merge):
        p.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.command == "run":
        recipe = RECIPES[args.task] if args.recipe else PLAIN
        take_recipe(args, recipe)
        if args.model_options is None:
            ssm_options = recipe.ssm_options(args.arch)
            args.model_options = {"ssm_options": ssm_options} if ssm_options else {}
    args.func(args)


if __name__ == "__main__":
    main()
