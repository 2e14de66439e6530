"""Launch options of the SSD Triton kernels on a GPU: one kernel's (num_warps, num_stages) changed at a time
from `triton_ssd.LAUNCH`, then the block rows and the internal chunk; each variant's output and gradients
checked against the current settings', and timed as GPU kernel time (the profiler's, so the host's launch
work does not blur it) at a prefill shape (forward, no autograd) and training shapes (forward + backward).

    python benchmarks/ssd_launch_sweep.py --out sweep.json [--shapes fwd:128x2048,fwdbwd:8x2048]

Prints, per shape, the variants faster than the current settings, and writes every row as JSON.
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from mambakit._io import write_json
from mambakit.bench.common import environment, gpu_kernel_times, rel_err
from mambakit.bench.ssd import CHUNK, ssd_inputs
from mambakit.ops.ssd import ssd, triton_ssd

SHAPES = [("fwd", 128, 2048), ("fwd", 1, 65536), ("fwdbwd", 8, 2048), ("fwdbwd", 2, 8192)]


def gpu_ms(fn, reps: int = 5) -> float:
    """Mean GPU time of fn() in ms: the sum of its kernels' device time (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    return gpu_kernel_times(fn, reps)[1] / 1000


def case(mode: str, batch: int, length: int):
    """(run, results): run() does the timed work; results() its output and gradients, for the check."""
    torch.manual_seed(0)
    inputs = ssd_inputs(batch, length)
    grad = torch.randn_like(inputs["x"])

    def forward():
        return ssd(**inputs, chunk_size=CHUNK, dt_softplus=True, backend="triton")

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return forward()
        for t in inputs.values():
            t.grad = None
        forward().backward(grad)

    def results():
        run()
        return [forward().detach()] if mode == "fwd" else [t.grad.clone() for t in inputs.values()]

    return run, results


@contextmanager
def variant(kernel: str | None = None, warps: int = 4, stages: int = 1, block_t: int | None = None,
            chunk: int | None = None):
    launch, bt, internal = dict(triton_ssd.LAUNCH), triton_ssd.BLOCK_T, triton_ssd.internal_chunk
    if kernel:
        triton_ssd.LAUNCH[kernel] = dict(num_warps=warps, num_stages=stages)
    if block_t:
        triton_ssd.BLOCK_T = block_t
    if chunk:
        triton_ssd.internal_chunk = lambda chunk_size: chunk
    try:
        yield
    finally:
        triton_ssd.LAUNCH.clear()
        triton_ssd.LAUNCH.update(launch)
        triton_ssd.BLOCK_T, triton_ssd.internal_chunk = bt, internal


def variants() -> list[dict]:
    found = []
    for kernel, base in triton_ssd.LAUNCH.items():
        for warps in (2, 4, 8):
            for stages in (1, 2, 3):
                if (warps, stages) != (base["num_warps"], base["num_stages"]):
                    found.append(dict(kernel=kernel, warps=warps, stages=stages))
    found += [dict(block_t=32), dict(block_t=128), dict(chunk=128), dict(chunk=64)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default=",".join(f"{m}:{b}x{n}" for m, b, n in SHAPES),
                        help="comma-separated mode:batchxlength (default: all of them)")
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        mode, size = shape.split(":")
        batch, length = map(int, size.split("x"))
        run, results = case(mode, batch, length)
        reference = results()
        base = gpu_ms(run)
        rows.append(dict(mode=mode, batch=batch, L=length, variant="current", ms=base, err=0.0))
        print(f"{mode} {batch}x{length}: current {base:.3f} ms", flush=True)
        for options in variants():
            with variant(**options):
                try:
                    err = max(rel_err(a, b) for a, b in zip(results(), reference))
                    ms = gpu_ms(run)
                except Exception as e:  # e.g. out of shared memory: a result too
                    err, ms = None, None
                    options = dict(options, error=f"{type(e).__name__}: {str(e)[:120]}")
            rows.append(dict(mode=mode, batch=batch, L=length, variant=json.dumps(options), ms=ms, err=err))
            if ms is not None and ms < base:
                print(f"  {json.dumps(options)}: {ms:.3f} ms ({ms / base:.2f}x), err {err:.1e}", flush=True)
        write_json(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
