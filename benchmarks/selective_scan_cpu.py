"""CPU selective scan: the `cpu` path against the `reference` loop, side by side in one process, forward and
forward+backward, fp32, N 16, with D, z, delta_bias and delta_softplus (a Mamba layer's call).

    OMP_NUM_THREADS=1 python benchmarks/selective_scan_cpu.py --threads 1 --shapes 1x256x256 2x768x512

Times are the minimum over repetitions of the process CPU time (robust on a shared machine; with one
thread it equals the compute time) and of the wall time. Relative errors of the outputs and gradients
against the reference are checked first. Rows are merged into benchmarks/results/selective_scan-cpu.json.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mambakit.bench.common import format_table, save_rows
from mambakit.ops import selective_scan

COLUMNS = ["backend", "threads", "batch", "dim", "L", "fwd_ms", "fwd_bwd_ms", "fwd_wall_ms", "fwd_bwd_wall_ms",
           "speedup_fwd", "speedup_fwd_bwd"]
RESULTS = Path(__file__).parent / "results" / "selective_scan-cpu.json"


def make_inputs(batch: int, dim: int, length: int, state_size: int = 16) -> dict:
    return dict(u=torch.randn(batch, dim, length), delta=torch.randn(batch, dim, length),
                A=-torch.exp(torch.randn(dim, state_size) * 0.5), B=torch.randn(batch, 1, state_size, length),
                C=torch.randn(batch, 1, state_size, length), D=torch.randn(dim), z=torch.randn(batch, dim, length),
                delta_bias=torch.randn(dim) * 0.5)


def run(inputs: dict, backend: str, backward: bool):
    leaves = {k: v.clone().requires_grad_(backward) for k, v in inputs.items()}
    out = selective_scan(**leaves, delta_softplus=True, backend=backend)
    if not backward:
        return [out]
    out.backward(torch.ones_like(out))
    return [out] + [t.grad for t in leaves.values()]


def min_times(fn, reps: int) -> tuple[float, float]:
    """(CPU ms, wall ms), each the minimum over `reps` calls after one warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return 1000 * min(cpu), 1000 * min(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1x256x256", "1x512x512", "2x768x512", "1x1536x1024"],
                        help="batch x dim x L")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        batch, dim, length = map(int, shape.split("x"))
        inputs = make_inputs(batch, dim, length)
        figures = {}
        for backend in ("reference", "cpu"):
            results = run(inputs, backend, backward=True)
            ref_results = run(inputs, "reference", backward=True) if backend == "cpu" else results
            err = max(((a - b).norm() / b.norm()).item() for a, b in zip(results, ref_results))
            with torch.no_grad():
                fwd = min_times(lambda: run(inputs, backend, backward=False), args.reps)
            fwd_bwd = min_times(lambda: run(inputs, backend, backward=True), args.reps)
            figures[backend] = dict(fwd_ms=fwd[0], fwd_wall_ms=fwd[1], fwd_bwd_ms=fwd_bwd[0],
                                    fwd_bwd_wall_ms=fwd_bwd[1], max_rel_err=err)
        for backend, fig in figures.items():
            rows.append(dict(backend=backend, threads=args.threads, batch=batch, dim=dim, L=length, **fig,
                             speedup_fwd=figures["reference"]["fwd_ms"] / fig["fwd_ms"],
                             speedup_fwd_bwd=figures["reference"]["fwd_bwd_ms"] / fig["fwd_bwd_ms"]))
        print(format_table(rows[-2:], COLUMNS), f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    save_rows(RESULTS, rows)
    print(format_table(rows, COLUMNS))
    print(f"largest relative error of outputs and gradients against the reference: "
          f"{max(r['max_rel_err'] for r in rows):.1e}")


if __name__ == "__main__":
    main()
