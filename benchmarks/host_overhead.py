"""Host (Python) cost of the Triton ops at small sizes, where it can exceed the GPU time: one fwd+bwd of
SSD and of the Mamba-1 scan at the benchmark shapes, eager (autograd.Function) against the custom ops
(what torch.compile traces), with the GPU's own busy time from the profiler for comparison.

    python benchmarks/host_overhead.py --lengths 512,2048,8192

Rows {"op", "L", "path", "host_ms", "wall_ms", "gpu_ms"} go into benchmarks/results/host_overhead-<gpu>.json.
host_ms: Python time per step, launches queued without waiting; wall_ms: do_bench's median;
gpu_ms: the sum of the step's CUDA kernel times. wall_ms well above gpu_ms means the host is the limit.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from mambakit.bench import selective_scan as bench_scan
from mambakit.bench import ssd as bench_ssd
from mambakit.bench.common import device_slug, environment, fwdbwd_step, save_rows, time_ms
from mambakit.ops.selective_scan import triton_scan
from mambakit.ops.ssd import triton_ssd

RESULTS = Path(__file__).parent / "results"
# op -> (module whose custom_op_if_compiling picks the path, inputs maker, function maker)
OPS = {"ssd": (triton_ssd, bench_ssd.ssd_inputs, lambda: bench_ssd.ssd_fn("mambakit")),
       "selective_scan": (triton_scan, bench_scan.scan_inputs, lambda: bench_scan.scan_fns("mambakit"))}


def gpu_ms(step, repeats: int = 5) -> float:
    """Summed CUDA kernel time of one step (torch profiler)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return sum(e.device_time_total for e in kernels) / repeats / 1e3


def host_ms(step, repeats: int = 200) -> float:
    """Python milliseconds per step with the launches queued, not waited for."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / repeats * 1e3


def measure(op: str, length: int, batch: int) -> list[dict]:
    module, make_inputs, make_fn = OPS[op]
    step = fwdbwd_step(make_fn(), make_inputs(batch, length))
    rows = []
    for path in ("eager", "custom_op"):
        # the custom-op path, as torch.compile would take it, but run eagerly
        force = mock.patch.object(module, "custom_op_if_compiling", lambda custom_op, eager: custom_op)
        with force if path == "custom_op" else contextlib.nullcontext():
            step()  # compile and warm up
            rows.append(dict(op=op, L=length, batch=batch, path=path, host_ms=host_ms(step), wall_ms=time_ms(step),
                             gpu_ms=gpu_ms(step)))
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {tuple(OPS)}")
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead: needs a CUDA GPU")
    rows = [row for op in args.ops.split(",") for L in map(int, args.lengths.split(","))
            for row in measure(op, L, args.batch)]
    save_rows(args.out / f"host_overhead-{device_slug()}.json", rows)
    print(environment()["device"])


if __name__ == "__main__":
    main()
