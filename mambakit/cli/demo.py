"""`mambakit demo`: train a small Mamba-2 from scratch on the embedded corpus (the Python standard
library's own source, no download) on the CPU in a few minutes, report validation bits per byte,
save the checkpoint and generate a continuation of a prompt with it."""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from mambakit.cli.train import add_train_options, given_options
from mambakit.training.lock import LOCK_FILE, RunLock

# A model and budget that train to readable Python-ish text on two CPU cores within the time limit.
DEMO_CONFIG = dict(
    arch="mamba2", d_model=128, n_layer=4, d_state=16, headdim=32, ssm_options={"chunk_size": 32},
    seq_len=256, batch_size=8, max_tokens=600_000, lr=3e-3, warmup_fraction=0.05, log_interval=10,
    eval_interval=100, eval_sequences=64, save_interval=100, keep_last=1, max_time=180.0, device="cpu",
)
DEFAULT_PROMPT = "import os\n\n\ndef read_config(path):\n"
DEFAULT_OUT = Path("runs/demo")
# What a run folder holds; --overwrite removes these and nothing else.
RUN_FILES = ("checkpoint-", ".checkpoint-", "latest", ".latest", "metrics.jsonl", ".metrics.jsonl", "loss.png",
             ".loss.png", "train_config.json", ".train_config.json", "tokenizer.json")


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train a small model on the CPU and generate with it",
                                   description=__doc__)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"run folder (default {DEFAULT_OUT}, or {DEFAULT_OUT}-2, -3, ... when that one is taken)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (its checkpoints, metrics and plot; other files stay)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    parser.add_argument("--new-tokens", type=int, default=300, help="tokens to generate (300)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_train_options(parser)
    parser.set_defaults(func=run)


def choose_out(out: Path | None) -> Path:
    """`out`, or the first of runs/demo, runs/demo-2, ... that is free (missing or empty)."""
    if out is not None:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"out: {out} is a file, expected a folder for the run")
        return out
    candidate, n = DEFAULT_OUT, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{n}")
    return candidate


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make `out` ready for a new run: refuse one holding anything unless `overwrite`, which removes the
    run files (RUN_FILES) it holds and keeps every other file."""
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if present and not overwrite:
        raise FileExistsError(f"out: {out} is not empty ({', '.join(present[:4])}{', ...' * (len(present) > 4)}); "
                              "pass --overwrite to replace the run in it, or choose another --out")
    for name in (n for n in present if n.startswith(RUN_FILES)):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def run(args: argparse.Namespace) -> int:
    from mambakit import MambaLMHeadModel
    from mambakit.tokenizer import load_tokenizer
    from mambakit.training import TrainConfig, Trainer

    start = time.perf_counter()
    if args.new_tokens < 1:  # checked now: the generation comes after minutes of training
        raise ValueError(f"new-tokens: expected an int >= 1, got {args.new_tokens}")
    if not args.prompt:
        raise ValueError("prompt: expected some text to continue, got ''")
    config = TrainConfig(**{**DEMO_CONFIG, **given_options(args)})
    out = choose_out(args.out)
    with RunLock(out):  # taken before anything in `out` is touched, so a running train keeps its folder
        prepare_out(out, args.overwrite)
        print(f"mambakit demo: a {config.n_layer}-layer {config.arch} (d_model {config.d_model}) learns Python "
              f"source byte by byte for up to {config.max_time:.0f} s on the {config.device or 'default device'}; "
              f"run folder {out}")
        trainer = Trainer(config, out, quiet=args.quiet)
        try:
            result = trainer.fit()
        finally:
            trainer.close()

    if "val_bpb" in result:  # absent when --val-fraction 0 holds nothing out
        print(f"\nvalidation: {result['val_bpb']:.3f} bits per byte (loss {result['val_loss']:.3f} nats per token, "
              f"perplexity {result['val_ppl']:.2f}) after {result['tokens']:,} training tokens ({result['step']} steps)")
    folder = Path(result["checkpoint"])
    model = MambaLMHeadModel.from_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    print(f"checkpoint: {folder} (MambaLMHeadModel.from_pretrained loads it; metrics in {out / 'metrics.jsonl'}, "
          f"curve in {out / 'loss.png'})\n")
    print("prompt + continuation (temperature 0.7, top-p 0.95):")
    print("-" * 72)
    print(args.prompt, end="", flush=True)
    # A model this small loses count of indentation and can emit spaces forever: such a run ends the sample.
    for piece in model.stream(args.prompt, tokenizer, max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95,
                              seed=args.seed or 0, stop_strings=[" " * 24]):
        print(piece, end="", flush=True)
    print("\n" + "-" * 72)
    print(f"demo done in {time.perf_counter() - start:.0f} s; train further with: "
          f"mambakit train --resume {out} --max-tokens 50M")
    return 0
