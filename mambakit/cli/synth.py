"""`mambakit synth`: train small models on a synthetic task and print accuracy by sequence length,
like the Mamba paper's tables; saves <out>/<task>.json and <task>.png (<task>-2.json, ... when an earlier
run's results are there: nothing is overwritten). Options left out take the task's recipe
(mambakit/tasks/recipes.py: training length, steps, batch, length curriculum, lr, Mamba-1's dt init).

    mambakit synth induction-heads --arch mamba --eval-lens 64,...,1048576
    mambakit synth selective-copying --arch mamba --eval-lens 256,1024,4096
    mambakit synth induction-heads --arch mamba,transformer --train-len 256 --steps 5000 --eval-lens 64,...,4096
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mambakit._io import pyplot, write_json, write_png
from mambakit.cli.train import int_list, json_object
from mambakit.tasks import TASKS
from mambakit.tasks.recipes import RECIPES, Recipe


def parse_lengths(text: str) -> list[int]:
    """'64,...,1024' -> [64, 128, 256, 512, 1024] (doubling across '...'); '256,4096' -> [256, 4096]."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or any(p != "..." and not (p.isdigit() and int(p) > 0) for p in parts):
        raise ValueError(f"eval-lens: expected positive lengths such as 64,...,1024 or 256,4096, got {text!r}")
    lengths: list[int] = []
    for i, part in enumerate(parts):
        if part != "...":
            lengths.append(int(part))
            continue
        if i == 0 or i + 1 == len(parts) or parts[i + 1] == "...":
            raise ValueError(f"eval-lens: '...' must stand between two lengths, got {text!r}")
        n, stop = lengths[-1] * 2, int(parts[i + 1])
        while n < stop:
            lengths.append(n)
            n *= 2
    return lengths


def token_count(text: str) -> int:
    """An int >= 0 for argparse."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a token count >= 0, got {text!r}")
    return int(text)


def register(subparsers) -> None:
    parser = subparsers.add_parser("synth", help="synthetic tasks: accuracy by sequence length",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--arch", default="mamba", help="comma-separated: mamba, mamba2, hybrid, transformer (mamba)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=None, help="SSM state size (mixer default)")
    parser.add_argument("--headdim", type=int, default=None, help="Mamba-2 head size")
    parser.add_argument("--ssm-options", type=json_object, default=None, metavar="JSON",
                        help='further mixer arguments, e.g. \'{"dt_scale": 20}\' (default: the recipe\'s, for '
                             'Mamba-1 its dt init; none for the other mixers)')
    parser.add_argument("--attn-heads", type=int, default=None, help="attention heads (d_model / 64)")
    parser.add_argument("--attn-layer-idx", type=int_list, default=None, metavar="I,J", help="hybrid: attention layers")
    parser.add_argument("--vocab", type=int, default=None, help="task vocabulary (the task's default)")
    parser.add_argument("--num-pairs", type=int, default=None, help="mqar: key-value pairs per sequence "
                        "(default: a quarter of the length)")
    parser.add_argument("--train-len", type=int, default=None, help="(recipe)")
    parser.add_argument("--eval-lens", type=lengths_arg, default=None, help="e.g. 64,...,1048576 (train length)")
    parser.add_argument("--steps", type=int, default=None, help="all steps, curriculum included (recipe)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step at --train-len (recipe)")
    parser.add_argument("--lr", type=float, default=None, help="Adam's (recipe)")
    add_schedule_arguments(parser)
    parser.add_argument("--eval-samples", type=int, default=256, help="sequences per length (fewer past 2^16)")
    parser.add_argument("--eval-chunk", type=token_count, default=1 << 16, metavar="TOKENS",
                        help="longer sequences are evaluated this many tokens at a time through the inference "
                             "cache, bounding memory (0: whole sequences; default 65536)")
    parser.add_argument("--max-attention-len", type=int, default=1 << 16,
                        help="longest length evaluated for models with attention (quadratic cost)")
    parser.add_argument("--max-time", type=float, default=None, metavar="SECONDS", help="training time per model")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/synth", help="folder for the JSON and PNG results")
    parser.set_defaults(func=run)


def parse_curriculum(text: str) -> list[tuple[int, ...]]:
    """'256:2000:128,1024:500' -> [(256, 2000, 128), (1024, 500)]: (length, steps[, batch]) stages trained
    before the training length."""
    stages = []
    for part in text.split(","):
        fields = [f.strip() for f in part.split(":")]
        if len(fields) not in (2, 3) or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise ValueError(f"curriculum: expected LENGTH:STEPS[:BATCH] stages such as 256:2000:128,1024:500, "
                             f"got {text!r}")
        stages.append(tuple(map(int, fields)))
    return stages


def curriculum_arg(text: str) -> list[tuple[int, ...]]:
    """parse_curriculum for argparse."""
    try:
        return parse_curriculum(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("curriculum: ")) from None


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """`train_task`'s learning-rate schedule, clipping and length curriculum options (`schedule_options`
    reads them back; `take_recipe` fills those left out)."""
    parser.add_argument("--warmup-steps", type=int, default=None, help="(recipe)")
    parser.add_argument("--min-lr-ratio", type=float, default=None,
                        help="below 1: cosine decay over --steps to lr x this (recipe; 1: constant, the papers')")
    parser.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0: none (recipe)")
    parser.add_argument("--curriculum", type=curriculum_arg, default=None, metavar="LEN:STEPS[:BATCH],...",
                        help="stages trained first, e.g. 256:2000:128 (2000 steps of 128 sequences of 256 tokens; "
                             "batch: --batch-size unless given), before --train-len takes the rest of --steps "
                             "(default: the recipe's if --train-len and --steps are left out too, else none)")


def take_recipe(args: argparse.Namespace, recipe: Recipe) -> None:
    """Fill the training options the command line left out (None) with `recipe`'s. Its curriculum goes
    with its length and steps: a command line that sets either trains without one unless it names one."""
    if args.curriculum is None:
        args.curriculum = list(recipe.curriculum) if args.train_len is None and args.steps is None else []
    options = recipe.train_options()
    options["train_len"] = options.pop("seq_len")
    for name, value in options.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def schedule_options(args: argparse.Namespace) -> dict:
    """The `train_task` keywords that `add_schedule_arguments` parsed."""
    return {"warmup_steps": args.warmup_steps, "min_lr_ratio": args.min_lr_ratio, "grad_clip": args.grad_clip or None,
            "curriculum": args.curriculum}


def build_task(name: str, vocab: int | None = None, num_pairs: int | None = None):
    """The task `name` with its default vocabulary unless `vocab`; `num_pairs` is mqar's only."""
    options = {} if vocab is None else {"vocab_size": vocab}
    if num_pairs is not None:
        if name != "mqar":
            raise ValueError(f"num-pairs: only the mqar task has key-value pairs, got task {name}")
        options["num_pairs"] = num_pairs
    return TASKS[name](**options)


def build_model(args: argparse.Namespace, task, arch: str, device):
    """The `arch` model of a `synth` run, sized by its options, for `task`'s vocabulary."""
    from mambakit.tasks.train import task_model

    return task_model(arch, task.vocab_size, args.d_model, args.n_layer, device=device,
                      **model_options(args, arch))


def model_options(args: argparse.Namespace, arch: str) -> dict:
    """The TrainConfig model fields of a synth command line's `arch` model: the mixer options given, else
    the task recipe's for that mixer."""
    options = {k: getattr(args, k) for k in ("d_state", "headdim", "ssm_options", "attn_heads", "attn_layer_idx")
               if getattr(args, k) is not None}
    if args.ssm_options is None and RECIPES[args.task].ssm_options(arch):
        options["ssm_options"] = RECIPES[args.task].ssm_options(arch)
    return options


def lengths_arg(text: str) -> list[int]:
    """parse_lengths for argparse."""
    try:
        return parse_lengths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("eval-lens: ")) from None


def check_args(args: argparse.Namespace):
    """(task, device, evaluation lengths) of a synth run, every argument checked before any training:
    a typo found after an hour of training would throw the run away."""
    import torch

    from mambakit.training import ARCHS, TrainConfig
    from mambakit.training.distributed import check_device

    take_recipe(args, RECIPES[args.task])
    for name in ("d_model", "n_layer", "train_len", "steps", "batch_size", "eval_samples", "max_attention_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    for name, ok, expected in (("lr", args.lr > 0, "> 0"), ("warmup_steps", args.warmup_steps >= 0, ">= 0"),
                               ("min_lr_ratio", 0 <= args.min_lr_ratio <= 1, "in [0, 1]"),
                               ("grad_clip", args.grad_clip is None or args.grad_clip >= 0, ">= 0"),
                               ("max_time", args.max_time is None or args.max_time > 0, "> 0")):
        if not ok:
            raise ValueError(f"{name.replace('_', '-')}: expected a number {expected}, got {getattr(args, name)}")
    curriculum_steps = sum(stage[1] for stage in args.curriculum)
    if curriculum_steps >= args.steps:
        raise ValueError(f"curriculum: its stages take {curriculum_steps} of the {args.steps} --steps, leaving "
                         f"none to --train-len")
    archs = args.arch.split(",")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"arch: expected comma-separated names from {ARCHS}, got {unknown}")
    device = check_device(args.device)
    task = build_task(args.task, args.vocab, args.num_pairs)
    lengths = args.eval_lens or [args.train_len]
    generator = torch.Generator().manual_seed(0)
    # the task refuses lengths it cannot fill
    for length in sorted({args.train_len, *lengths, *(stage[0] for stage in args.curriculum)}):
        task.sample(1, length, generator)
    for arch in archs:  # the model options, as build_model will pass them
        TrainConfig(arch=arch, d_model=args.d_model, n_layer=args.n_layer, **model_options(args, arch)).model_config(
            task.vocab_size)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"out: cannot create the results folder ({err.strerror})", str(out)) from None
    if not os.access(out, os.W_OK):
        raise PermissionError(f"out: cannot write into {out}")
    return task, device, lengths


def run(args: argparse.Namespace) -> int:
    import torch

    from mambakit.tasks.train import accuracy, train_task

    task, device, lengths = check_args(args)
    rows = []
    for arch in args.arch.split(","):
        torch.manual_seed(args.seed)
        model = build_model(args, task, arch, device)
        start = time.perf_counter()
        log = train_task(model, task, args.train_len, args.steps, args.batch_size, args.lr, seed=args.seed,
                         max_time=args.max_time, bf16=args.bf16, **schedule_options(args))
        train_s = time.perf_counter() - start
        has_attention = bool(model.config.attn_layer_idx)
        acc = {}
        for length in lengths:
            if has_attention and length > args.max_attention_len:
                acc[length] = None
                continue
            samples = args.eval_samples if length <= 1 << 16 else max(4, args.eval_samples >> 5)
            try:
                acc[length] = accuracy(model, task, length, samples, args.batch_size, seed=args.seed + 1,
                                       bf16=args.bf16, chunk_len=args.eval_chunk or None)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                acc[length] = None
        rows.append({"arch": arch, "params": sum(p.numel() for p in model.parameters()),
                     "model_options": model_options(args, arch), "steps": log[-1]["step"],
                     "train_s": round(train_s, 1), "final_loss": log[-1]["loss"], "accuracy": acc})
        print(format_row(rows[-1], lengths, header=len(rows) == 1))
    stem = free_stem(Path(args.out), task.name)
    write_json(stem.with_suffix(".json"), {"task": task.name, "task_config": vars(task), "train_len": args.train_len,
                                           "device": str(device), "args": _plain(vars(args)), "rows": rows})
    plot_accuracy(rows, lengths, args.train_len, stem.with_suffix(".png"), task.name)
    if len(rows) > 1:  # each row was printed as its model finished; now all of them together
        print("\n" + format_table(rows, lengths))
    print(f"\nsaved {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


def free_stem(out: Path, name: str) -> Path:
    """out/name, or out/name-2, -3, ... when an earlier run's name.json or name.png is there: results a user
    saved are never overwritten."""
    stem, n = out / name, 1
    while stem.with_suffix(".json").exists() or stem.with_suffix(".png").exists():
        n += 1
        stem = out / f"{name}-{n}"
    return stem


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, list, dict, bool, type(None)))}


def _length_label(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 and n >= 64 else str(n)


def format_row(row: dict, lengths: list[int], header: bool = False) -> str:
    accuracy = [row["accuracy"].get(n) for n in lengths]  # a row may lack lengths other rows have
    cells = ["-" if a is None else f"{100 * a:.1f}" for a in accuracy]
    line = f"{row['arch']:>12} {row['params']:>8,} " + " ".join(f"{c:>6}" for c in cells)
    if not header:
        return line
    head = f"{'model':>12} {'params':>8} " + " ".join(f"{_length_label(n):>6}" for n in lengths)
    return head + "\n" + line


def format_table(rows: list[dict], lengths: list[int]) -> str:
    """Accuracy (%) by length, one row per model ('-': not run: out of memory or past --max-attention-len)."""
    return "\n".join(format_row(r, lengths, header=i == 0) for i, r in enumerate(rows))


def plot_accuracy(rows: list[dict], lengths: list[int], train_len: int, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for row in rows:
        points = [(n, 100 * a) for n, a in sorted(row["accuracy"].items()) if a is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=f"{row['arch']} ({row['params']:,} params)")
    ax.axvline(train_len, color="gray", ls="--", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(fig, path)
