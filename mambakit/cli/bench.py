"""`mambakit bench`: GPU kernel benchmarks, ours against the official kernels and baselines, side by side."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

OPS = ("selective_scan", "ssd")
COLUMNS = ["op", "impl", "L", "fwd_ms", "fwdbwd_ms", "fwd_gbs"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time the kernels against the official ones (GPU)",
        description="Time each op's paths (ours, the official mamba_ssm kernels where installed, "
                    "flash-linear-attention, causal SDPA, the reference) at batch x L, forward and "
                    "forward+backward; merge rows into OUT/kernels-<gpu>.json and print a table.",
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {OPS}")
    p.add_argument("--lengths", default="512,2048,8192,32768", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mambakit.bench.common import device_slug, format_table, save_rows

    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise SystemExit(f"mambakit bench: error: --ops: expected names from {OPS}, got {unknown}")
    if not torch.cuda.is_available():
        raise SystemExit("mambakit bench: error: the kernel benchmarks need a CUDA GPU")
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for op in ops:
        rows += importlib.import_module(f"mambakit.bench.{op}").run(lengths, args)
    save_rows(args.out / f"kernels-{device_slug()}.json", rows)
    print(format_table(rows, COLUMNS))
    return 0
