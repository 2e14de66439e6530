"""Kernel benchmarks on a GPU: ours against the official mamba_ssm kernels, flash-linear-attention,
the PyTorch reference and causal SDPA, side by side in one process.

    python benchmarks/kernels.py --ops selective_scan,ssd --lengths 512,2048,8192,32768

Each op lives in `mambakit.bench.<op>` with `run(lengths, args) -> list[dict]`; rows are merged into
benchmarks/results/kernels-<gpu>.json and a table is printed last.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from mambakit.bench.common import device_slug, format_table, save_rows

COLUMNS = ["op", "impl", "L", "fwd_ms", "fwdbwd_ms", "fwd_gbs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="selective_scan,ssd", help="comma-separated ops to time")
    parser.add_argument("--lengths", default="512,2048,8192,32768", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for op in args.ops.split(","):
        rows += importlib.import_module(f"mambakit.bench.{op}").run(lengths, args)
    save_rows(args.out / f"kernels-{device_slug()}.json", rows)
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
