"""Kernel benchmarks on a GPU, side by side in one process (the same as `mambakit bench`).

    python benchmarks/kernel_timings.py --ops selective_scan,ssd --lengths 512,2048,8192,32768

Each op lives in `mambakit.bench.<op>` with `run(lengths, args) -> list[dict]`; rows are merged into
benchmarks/results/kernels-<gpu>.json and a table is printed last.
"""
import sys

from mambakit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
