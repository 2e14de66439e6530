"""Launch configurations of the fused norm + linear decode kernel (mambakit/ops/norm_linear) at the
model shapes' decode steps, against the unfused pair it replaces (the Triton norm, then cuBLAS): GPU
microseconds per call, replayed in a CUDA graph (as decoding runs), fp16.

    python benchmarks/norm_linear_sweep.py

Rows {"site", "shape", "rows", "config", "us", "unfused_us"} go to
benchmarks/results/norm_linear_sweep-<gpu>.json (or --out; replaced); the best configuration per site
and the default's are printed last.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from mambakit._io import write_json
from mambakit.bench.common import device_slug, environment, format_table
from mambakit.ops import norm_linear, rms_norm, rms_norm_gated
from mambakit.ops.norm_linear import triton_decode

# (shape, site) -> (in, out): in_proj after the pre-norm (Mamba-2 then Mamba-1), out_proj after Mamba-2's gated norm
SITES = {("130m", "mamba2 in_proj"): (768, 3352), ("130m", "mamba in_proj"): (768, 3072),
         ("130m", "mamba2 out_proj"): (1536, 768), ("1.4b", "mamba2 in_proj"): (2048, 8512),
         ("1.4b", "mamba2 out_proj"): (4096, 2048)}
CONFIGS = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w)
           for n, k, w in itertools.product((4, 8, 16), ("group", 512), (4, 8))]


def calls(site: str, hidden: int, out: int, rows: int):
    """(fused call, unfused call) on fresh random fp16 inputs."""
    x, z = (torch.randn(rows, hidden, device="cuda", dtype=torch.float16) for _ in range(2))
    residual = torch.randn(rows, hidden, device="cuda")
    norm_w = torch.ones(hidden, device="cuda", dtype=torch.float16)
    weight = torch.randn(out, hidden, device="cuda", dtype=torch.float16) / hidden**0.5
    if "in_proj" in site:
        def fused():
            return norm_linear.rms_norm_linear(x, norm_w, weight, residual=residual, residual_in_fp32=True)

        def unfused():
            normed, _ = rms_norm(x, norm_w, residual=residual, prenorm=True, residual_in_fp32=True)
            return F.linear(normed, weight)
    else:
        def fused():
            return norm_linear.rms_norm_gated_linear(x, z, norm_w, weight, norm_before_gate=False)

        def unfused():
            return F.linear(rms_norm_gated(x, norm_w, z=z, norm_before_gate=False), weight)
    return fused, unfused


def bench_us(fn) -> float:
    fn()
    return do_bench_cudagraph(fn, rep=20) * 1000


@torch.no_grad()
def sweep(rows_list: list[int]) -> list[dict]:
    results = []
    for (shape, site), (hidden, out) in SITES.items():
        for rows in rows_list:
            fused, unfused = calls(site, hidden, out, rows)
            unfused_us = bench_us(unfused)
            default = triton_decode.launch_config(hidden)
            for config in [dict(default, default=True)] + CONFIGS:
                launch = {k: v for k, v in config.items() if k != "default"}
                if launch["BLOCK_K"] == "group":
                    launch["BLOCK_K"] = default["BLOCK_K"]
                with mock.patch.object(triton_decode, "launch_config", lambda *a, launch=launch: launch):
                    us = bench_us(fused)
                results.append(dict(site=site, shape=shape, rows=rows, default=config.get("default", False),
                                    config=f"{launch['BLOCK_N']}x{launch['BLOCK_K']}w{launch['num_warps']}",
                                    us=us, unfused_us=unfused_us))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("norm_linear_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    results = sweep([int(r) for r in args.rows.split(",")])
    out = args.out or Path(__file__).parent / "results" / f"norm_linear_sweep-{device_slug()}.json"
    write_json(out, {"environment": environment(), "rows": results})
    summary = []
    for key in sorted({(r["shape"], r["site"], r["rows"]) for r in results}):
        group = [r for r in results if (r["shape"], r["site"], r["rows"]) == key]
        best, default = min(group, key=lambda r: r["us"]), next(r for r in group if r["default"])
        summary.append(dict(shape=key[0], site=key[1], rows=key[2], unfused_us=best["unfused_us"],
                            default=default["config"], default_us=default["us"], best=best["config"],
                            best_us=best["us"]))
    print(format_table(summary, ["shape", "site", "rows", "unfused_us", "default", "default_us", "best", "best_us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
