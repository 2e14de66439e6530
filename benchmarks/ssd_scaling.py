"""Time per token of the fused Triton SSD from 8K to 1M tokens (batch 1), forward and forward+backward.

    python benchmarks/ssd_scaling.py                 # on a GPU: measure, write results/ssd_scaling-<gpu>.json
    python benchmarks/ssd_scaling.py --plot FILE.json  # anywhere: draw FILE.png from a results file

Linear-time scaling shows as a flat line of nanoseconds per token.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mambakit.bench.common import device_slug, format_table, save_rows
from mambakit.bench.common import fwd_and_fwdbwd_ms
from mambakit.bench.ssd import CHUNK, official_ssd, ssd_fn, ssd_inputs

COLUMNS = ["impl", "L", "fwd_ms", "fwdbwd_ms", "fwd_ns_per_token", "fwdbwd_ns_per_token", "finite"]


def measure(lengths: list[int], impls: list[str]) -> list[dict]:
    rows = []
    for L in lengths:
        inputs = ssd_inputs(1, L)
        for impl in impls:
            if impl == "official" and official_ssd() is None:
                continue
            fwd, fwdbwd = fwd_and_fwdbwd_ms(ssd_fn(impl), inputs, backward=True)
            rows.append(dict(op="ssd_scaling", impl=impl, L=L, batch=1, chunk=CHUNK, fwd_ms=fwd, fwdbwd_ms=fwdbwd,
                             fwd_ns_per_token=fwd * 1e6 / L, fwdbwd_ns_per_token=fwdbwd * 1e6 / L,
                             finite=all_finite(ssd_fn(impl), inputs)))
        del inputs
        torch.cuda.empty_cache()
    return rows


def all_finite(fn, inputs: dict) -> bool:
    """No NaN or inf in the output or in any gradient (bf16, the whole length)."""
    out = fn(inputs)
    grads = torch.autograd.grad(out, list(inputs.values()), torch.randn_like(out))
    return bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in sorted({r["impl"] for r in doc["rows"]}):
        rows = sorted((r for r in doc["rows"] if r["impl"] == impl), key=lambda r: r["L"])
        for key, style in (("fwd_ms", "o--"), ("fwdbwd_ms", "s-")):
            ax.plot([r["L"] for r in rows], [r[key] * 1e6 / r["L"] for r in rows], style,
                    label=f"{impl} {key.removesuffix('_ms').replace('fwdbwd', 'fwd+bwd')}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens (batch 1)")
    ax.set_ylabel("ns per token")
    ax.set_title(f"Mamba-2 SSD, 24 heads x 64, N 128, bf16 — {doc['environment']['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=",".join(str(1 << k) for k in range(13, 21)))
    parser.add_argument("--impls", default="mambakit,official")
    parser.add_argument("--official-max", type=int, default=1 << 18, help="longest L the official kernel is timed at")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--plot", type=Path, help="draw this results file instead of measuring")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    impls = args.impls.split(",")
    rows = measure(lengths, [i for i in impls if i != "official"])
    if "official" in impls:
        rows += measure([L for L in lengths if L <= args.official_max], ["official"])
    save_rows(args.out / f"ssd_scaling-{device_slug()}.json", rows)
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
