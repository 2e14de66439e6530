"""Launch options of the Mamba-1 scan backward on a GPU: warps per program, a register cap (maxnreg) and the
tile (TILE_L, also the forward's checkpoint stride), one variant at a time; each variant's output and
gradients checked against the current settings' and its forward + backward timed (CUDA events, median), at
the training shape and at longer sequences (shapes of `mambakit.bench.selective_scan`).

    python benchmarks/scan_bwd_sweep.py --out sweep.json

Why: the backward compiles to 255 registers a thread with 1-warp programs, 8 warps an SM, and is limited by
latency rather than by its instruction mix (benchmarks/results/train_gpu-h200-notes.md).
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from mambakit.bench.common import environment, format_table, fwdbwd_step, rel_err, time_ms
from mambakit.bench.selective_scan import scan_fns, scan_inputs
from mambakit.ops.selective_scan import triton_scan

SHAPES = [(8, 2048), (2, 8192), (1, 32768)]  # (batch, L): the same tokens per call
VARIANTS = [dict(warps=w, maxnreg=m, tile=t) for t in (64, 32) for w in (1, 2, 4) for m in (None, 128, 96)]


@contextmanager
def variant(warps: int, maxnreg: int | None, tile: int):
    saved = triton_scan.BWD_WARPS, triton_scan.BWD_MAXNREG, triton_scan.TILE_L
    triton_scan.BWD_WARPS, triton_scan.BWD_MAXNREG, triton_scan.TILE_L = warps, maxnreg, tile
    try:
        yield
    finally:
        triton_scan.BWD_WARPS, triton_scan.BWD_MAXNREG, triton_scan.TILE_L = saved


def results(fn, inputs: dict, grad: torch.Tensor) -> list[torch.Tensor]:
    """The output and the gradient of every input, for one output gradient."""
    out = fn(inputs)
    return [out, *torch.autograd.grad(out, list(inputs.values()), grad)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fn = scan_fns("mambakit")
    current = dict(warps=triton_scan.BWD_WARPS, maxnreg=triton_scan.BWD_MAXNREG, tile=triton_scan.TILE_L)
    rows = []
    for batch, length in SHAPES:
        torch.manual_seed(0)
        inputs = scan_inputs(batch, length)
        grad = torch.randn_like(fn(inputs))
        reference = results(fn, inputs, grad)
        base = time_ms(fwdbwd_step(fn, inputs))
        rows.append(dict(batch=batch, L=length, **current, fwdbwd_ms=base, ratio=1.0, err=0.0))
        for options in VARIANTS:
            if options == current:
                continue
            with variant(**options):
                try:
                    err = max(rel_err(a, b) for a, b in zip(results(fn, inputs, grad), reference))
                    ms = time_ms(fwdbwd_step(fn, inputs))
                except Exception as e:  # e.g. a cap the compiler cannot meet: a result too
                    err = ms = None
                    options = dict(options, error=f"{type(e).__name__}: {str(e)[:120]}")
            rows.append(dict(batch=batch, L=length, **options, fwdbwd_ms=ms, ratio=ms / base if ms else None,
                             err=err))
        args.out.write_text(json.dumps({"environment": environment(), "current": current, "rows": rows}, indent=1))
    print(format_table(rows, ["batch", "L", "warps", "maxnreg", "tile", "fwdbwd_ms", "ratio", "err"]))


if __name__ == "__main__":
    main()
