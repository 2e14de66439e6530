"""Language modeling at equal parameters and tokens: Mamba, Mamba-2 and Transformer++ trained by the same
trainer on the embedded corpus (the Python standard library's source, bytes), validation loss compared.

Sizes follow the papers' convention: an SSM block (~6 d^2 parameters) is half a Transformer layer
(attention 4 d^2 + SwiGLU 8 d^2), so the SSMs get twice the layers.

    python benchmarks/train_lm.py --d-model 256 --n-layer 8 --max-tokens 6M

Writes train_lm-<device>.json to --out (benchmarks/results) and prints a table last.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mambakit._io import write_json
from mambakit.bench.common import device_slug, environment, format_table
from mambakit.training import TrainConfig, Trainer, parse_count

COLUMNS = ["arch", "n_layer", "params", "tokens", "steps", "val_loss", "val_bpb", "train_s", "tok_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="mamba,mamba2,transformer")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=8, help="SSM layers; the Transformer++ gets half")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=parse_count, default=parse_count("6M"))
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-time", type=float, default=None, help="seconds per model (safety cap)")
    parser.add_argument("--eval-sequences", type=int, default=512)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    rows = []
    for arch in args.archs.split(","):
        n_layer = args.n_layer // 2 if arch == "transformer" else args.n_layer
        config = TrainConfig(
            arch=arch, d_model=args.d_model, n_layer=n_layer, seq_len=args.seq_len, batch_size=args.batch_size,
            max_tokens=args.max_tokens, lr=args.lr, warmup_fraction=0.05, eval_interval=10**9, log_interval=50,
            eval_sequences=args.eval_sequences, save_interval=10**9, keep_last=1, max_time=args.max_time,
            device=args.device, d_state=16 if arch == "mamba" else None,
        )
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(config, run_dir, quiet=True)
            start = time.perf_counter()
            result = trainer.fit()
            train_s = time.perf_counter() - start
        rows.append({"arch": arch, "n_layer": n_layer, "d_model": args.d_model,
                     "params": sum(p.numel() for p in trainer.model.parameters()),
                     "tokens": result["tokens"], "steps": result["step"], "val_loss": result["val_loss"],
                     "val_bpb": result["val_bpb"], "train_s": round(train_s, 1),
                     "tok_per_s": round(result["tokens"] / train_s), "stopped": result["stopped"]})
        print(format_table(rows[-1:], COLUMNS), flush=True)
        write_json(args.out / f"train_lm-{device_slug()}.json",  # after each model: a timeout keeps the others
                   {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"\nvalidation loss at equal tokens ({args.max_tokens:,}), bytes of Python source, d_model {args.d_model}")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
