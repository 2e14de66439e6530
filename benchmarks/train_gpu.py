"""One training step on a GPU, side by side in one process: mambakit's Mamba-1 and Mamba-2 (eager and under
`torch.compile`) against the official `mamba_ssm` and a same-size transformers Llama. 130M or 1.4B shape
(--size), bf16 autocast, fused AdamW, next-token cross-entropy on random tokens (mambakit's as `mambakit
train` computes it: the backbone, then the chunked `linear_cross_entropy`; the others from their logits);
median step time over timed steps, tokens/s and peak memory.

    python benchmarks/train_gpu.py --official /tmp/mamba_ssm_src/mamba_ssm-2.3.2.post1
    python benchmarks/train_gpu.py --shapes 2048:8,8192:2,32768:1 --impls mambakit
    python benchmarks/train_gpu.py --size 1.4b --shapes 2048:4

--official is the folder of the built official package (`python -m mambakit.bench.selective_scan <sdist>`).
Rows go to benchmarks/results/train_gpu-<gpu>.json (or --out), merged with the rows already there.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from generation_gpu import SHAPES, VOCAB, build  # noqa: E402  (the generation benchmark's models)

from mambakit.bench.common import device_slug, format_table, gpu_kernel_times, save_rows  # noqa: E402
from mambakit.ops import linear_cross_entropy  # noqa: E402
from mambakit.training.graphs import warm_up  # noqa: E402

COLUMNS = ["impl", "arch", "shape", "compiled", "graph", "seq_len", "batch", "tok_s", "step_ms", "host_ms", "peak_gb"]


def build_for_training(impl: str, arch: str, size: str):
    """fp32 weights (autocast computes in bf16); the official Mamba-2 without its fused training path, which
    needs the causal-conv1d package (not installed), as in generation_gpu."""
    return build(impl, arch, size, torch.float32)


def kernel_profile(step, steps: int = 2, top: int = 30) -> dict:
    """GPU ms per step, split by kernel (the `top` longest), over `steps` profiled steps."""
    kernels, us, launches = gpu_kernel_times(step, steps)
    return {"gpu_ms": us / 1000, "launches": launches,
            "kernels": [{"name": k["name"], "calls": k["calls"], "ms": k["us"] / 1000} for k in kernels[:top]]}


def measure(impl: str, arch: str, size: str, compiled: bool, seq_len: int, batch: int, steps: int,
            with_profile: bool = False, loss_backend: str | None = None, graphed: bool = False) -> dict:
    """graphed: the whole step (forward, backward, AdamW with capturable state) captured once in a CUDA graph
    and replayed, so the host launches nothing per step."""
    model = build_for_training(impl, arch, size).train()
    if compiled:
        model.backbone.compile()  # in place, as `mambakit train --compile` does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed)
    ids = torch.randint(0, VOCAB, (batch, seq_len + 1), device="cuda")
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step():
        # Under graph capture the autocast cache of bf16 weight copies must be off (they'd be freed at exit).
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            if impl == "mambakit":
                hidden = model.backbone(inputs)
                loss = linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(),
                                            backend=loss_backend)
            else:
                logits = model(inputs).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # kernels compiled, autotuned; off the default stream, as capture wants
        warm_up(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # before the capture: the graph's private pool is what a step holds
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        step = graph.replay
    times, host_times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        host_times.append((time.perf_counter() - start) * 1000)  # the host's share: launches queued, no wait
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    ms = statistics.median(times)
    row = dict(impl=impl, arch=arch, compiled=compiled, **({"graph": True} if graphed else {}), shape=size,
               seq_len=seq_len, batch=batch, tok_s=batch * seq_len / ms * 1000, step_ms=ms,
               host_ms=statistics.median(host_times), peak_gb=torch.cuda.max_memory_allocated() / 1e9)
    if with_profile:
        row["profile"] = kernel_profile(step)
    del model, optimizer
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="mambakit,official,transformers")
    parser.add_argument("--archs", default="mamba,mamba2")
    parser.add_argument("--size", choices=sorted(SHAPES), default="130m", help="model shape")
    parser.add_argument("--shapes", default="2048:8", help="comma-separated seq_len:batch pairs")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="both",
                        help="mambakit eager, compiled, or both")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="add each row's GPU time per step by kernel (torch profiler, two more steps)")
    parser.add_argument("--graph", action="store_true",
                        help="also mambakit's eager step captured whole in one CUDA graph and replayed")
    parser.add_argument("--loss-backend", choices=["reference", "triton"],
                        help="mambakit's chunk loss (linear_cross_entropy's backend; default: Triton on CUDA)")
    parser.add_argument("--official", help="folder holding the built official mamba_ssm (put on sys.path)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.official:
        sys.path.insert(0, args.official)
    out = args.out or Path("benchmarks/results") / f"train_gpu-{device_slug()}.json"
    shapes = [tuple(int(v) for v in pair.split(":")) for pair in args.shapes.split(",")]
    compiled = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    rows = []
    for seq_len, batch in shapes:
        for impl in args.impls.split(","):
            for arch in (["llama"] if impl == "transformers" else args.archs.split(",")):
                variants = [(comp, False) for comp in compiled] + ([(False, True)] if args.graph else [])
                for comp, graphed in (variants if impl == "mambakit" else [(False, False)]):
                    try:
                        row = measure(impl, arch, args.size, comp, seq_len, batch, args.steps, args.profile,
                                      args.loss_backend, graphed)
                    except torch.OutOfMemoryError:
                        row = dict(impl=impl, arch=arch, compiled=comp, shape=args.size, seq_len=seq_len,
                                   batch=batch, oom=True)
                        torch.cuda.empty_cache()
                    except Exception as e:  # a failed variant is a result too (e.g. torch.compile); the others go on
                        row = dict(impl=impl, arch=arch, compiled=comp, shape=args.size, seq_len=seq_len,
                                   batch=batch, error=f"{type(e).__name__}: {str(e)[:300]}")
                        torch.cuda.empty_cache()
                    print({k: v for k, v in row.items() if k != "profile"}, flush=True)
                    for kernel in row.get("profile", {}).get("kernels", []):
                        print(f"    {kernel['ms']:8.3f} ms {kernel['calls']:6.0f}x  {kernel['name']}")
                    rows.append(row)
                    save_rows(out, [row])
    print(format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
