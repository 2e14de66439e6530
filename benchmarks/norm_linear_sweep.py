"""Launch configurations of the fused norm + linear decode kernel (mambakit/ops/norm_linear) at the
model shapes' decode steps, against the unfused pair it replaces (the Triton norm, then cuBLAS; cuBLAS alone
for the plain linear layers): GPU microseconds per call, replayed in a CUDA graph (as decoding runs), fp16,
each call on the next of LAYERS weight copies (as a decode step reads every layer's: from DRAM, not L2).

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
from mambakit.ops._common import overlapped_launches
from mambakit.ops.norm_linear import triton_decode

# (shape, site) -> (in, out): in_proj after the pre-norm (Mamba-2 then Mamba-1), out_proj after Mamba-2's gated
# norm; Mamba-1's x_proj and out_proj are plain linear layers
SITES = {("130m", "mamba2 in_proj"): (768, 3352), ("130m", "mamba in_proj"): (768, 3072),
         ("130m", "mamba2 out_proj"): (1536, 768), ("130m", "mamba x_proj"): (1536, 80),
         ("130m", "mamba out_proj"): (1536, 768), ("1.4b", "mamba2 in_proj"): (2048, 8512),
         ("1.4b", "mamba2 out_proj"): (4096, 2048)}
CONFIGS = [dict(BLOCK_N=n, BLOCK_K="group", num_warps=w) for n, w in itertools.product((1, 2, 4, 8, 16), (2, 4, 8))]
LAYERS = 24


def calls(site: str, hidden: int, out: int, rows: int):
    """(fused call, unfused call) on fresh random fp16 inputs, each call on the next weight copy."""
    x, z = (torch.randn(rows, hidden, device="cuda", dtype=torch.float16) for _ in range(2))
    residual = torch.randn(rows, hidden, device="cuda")
    norm_w = torch.ones(hidden, device="cuda", dtype=torch.float16)
    linears = [torch.nn.Linear(hidden, out, bias=False, device="cuda", dtype=torch.float16) for _ in range(LAYERS)]
    turn = itertools.cycle(linears)
    if "in_proj" in site:
        def fused():
            return norm_linear.rms_norm_linear(x, norm_w, next(turn).weight, residual=residual, residual_in_fp32=True)

        def unfused():
            normed, _ = rms_norm(x, norm_w, residual=residual, prenorm=True, residual_in_fp32=True)
            return F.linear(normed, next(turn).weight)
    elif site == "mamba2 out_proj":
        def fused():
            return norm_linear.rms_norm_gated_linear(x, z, norm_w, next(turn).weight, norm_before_gate=False)

        def unfused():
            return F.linear(rms_norm_gated(x, norm_w, z=z, norm_before_gate=False), next(turn).weight)
    else:
        def fused():
            return norm_linear.decode_linear(next(turn), x)

        def unfused():
            return next(turn)(x)
    return fused, unfused


def bench_us(fn) -> float:
    """Per call: the graph replays LAYERS calls, each on its own weights."""
    def layers():
        for _ in range(LAYERS):
            fn()

    layers()
    return do_bench_cudagraph(layers, rep=20) * 1000 / LAYERS


@torch.no_grad()
def sweep(rows_list: list[int]) -> list[dict]:
    results = []
    for (shape, site), (hidden, out) in SITES.items():
        for rows in rows_list:
            fused, unfused = calls(site, hidden, out, rows)
            unfused_us = bench_us(unfused)
            default = triton_decode.launch_config(hidden, out)
            for config in [dict(default, default=True)] + CONFIGS:
                launch = {k: v for k, v in config.items() if k != "default"}
                if launch["BLOCK_K"] == "group":
                    launch["BLOCK_K"] = default["BLOCK_K"]
                if launch["BLOCK_N"] * launch["BLOCK_K"] > 2 * triton_decode.TILE_ELEMENTS:
                    continue  # spills registers
                with mock.patch.object(triton_decode, "launch_config", lambda *a, launch=launch: launch):
                    us = bench_us(fused)
                results.append(dict(site=site, shape=shape, rows=rows, default=config.get("default", False),
                                    config=f"{launch['BLOCK_N']}x{launch['BLOCK_K']}w{launch['num_warps']}",
                                    us=us, unfused_us=unfused_us))
            with overlapped_launches():  # the default again, each launch overlapping the one before (PDL)
                results.append(dict(site=site, shape=shape, rows=rows, default=False, config="default+pdl",
                                    us=bench_us(fused), unfused_us=unfused_us))
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
        pdl = next(r for r in group if r["config"] == "default+pdl")
        summary.append(dict(shape=key[0], site=key[1], rows=key[2], unfused_us=best["unfused_us"],
                            default=default["config"], default_us=default["us"], pdl_us=pdl["us"],
                            best=best["config"], best_us=best["us"]))
    print(format_table(summary, ["shape", "site", "rows", "unfused_us", "default", "default_us", "pdl_us", "best",
                                 "best_us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
