"""`mambakit demo`: train a small Mamba-2 from scratch on the embedded corpus (the Python standard
library's own source, no download) on the CPU in a few minutes, report validation bits per byte,
save the checkpoint and generate a continuation of a prompt with it."""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from mambakit.cli.train import add_train_options, given_options

# A model and budget that train to readable Python-ish text on two CPU cores within the time limit.
DEMO_CONFIG = dict(
    arch="mamba2", d_model=128, n_layer=4, d_state=16, headdim=32, ssm_options={"chunk_size": 32},
    seq_len=256, batch_size=8, max_tokens=600_000, lr=3e-3, warmup_fraction=0.05, log_interval=10,
    eval_interval=100, eval_sequences=64, save_interval=100, keep_last=1, max_time=180.0, device="cpu",
)
DEFAULT_PROMPT = "import os\n\n\ndef read_config(path):\n"
# What a demo run folder may hold; anything else means the folder is not ours to replace.
RUN_FILES = ("checkpoint-", ".checkpoint-", "latest", ".latest", "metrics.jsonl", "loss.png", "train_config.json")


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train a small model on the CPU and generate with it",
                                   description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run folder, replaced on each demo (runs/demo)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    parser.add_argument("--new-tokens", type=int, default=300, help="tokens to generate (300)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_train_options(parser)
    parser.set_defaults(func=run)


def _clear_previous_demo(out: Path) -> None:
    if not out.exists():
        return
    foreign = [p.name for p in out.iterdir() if not p.name.startswith(RUN_FILES)]
    if foreign:
        raise FileExistsError(f"out: {out} holds files that are not a demo run's ({foreign[:5]}); choose another --out")
    shutil.rmtree(out)


def run(args: argparse.Namespace) -> int:
    from mambakit import MambaLMHeadModel
    from mambakit.tokenizer import load_tokenizer
    from mambakit.training import TrainConfig, Trainer

    start = time.perf_counter()
    config = TrainConfig(**{**DEMO_CONFIG, **given_options(args)})
    out = Path(args.out)
    _clear_previous_demo(out)
    print(f"mambakit demo: a {config.n_layer}-layer {config.arch} (d_model {config.d_model}) learns Python source "
          f"byte by byte for up to {config.max_time:.0f} s on the {config.device or 'default device'}")
    trainer = Trainer(config, out, quiet=args.quiet)
    result = trainer.fit()

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
