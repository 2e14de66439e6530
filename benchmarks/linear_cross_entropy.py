"""The LM head's loss, plain (full fp32 logits, then F.cross_entropy) against the chunked
`mambakit.ops.linear_cross_entropy`, side by side: forward+backward time, peak memory (CUDA) and the
largest single tensor either builds. On CUDA under bf16 autocast, as the trainer runs it.

    python benchmarks/linear_cross_entropy.py                      # CUDA: 8 x 2048 tokens, 130M head
    python benchmarks/linear_cross_entropy.py --tokens 2048 --d-model 128 --vocab 8192   # CPU, small

Rows {"path", "chunk_size", "tokens", "d_model", "vocab", "fwdbwd_ms", "peak_gb", "largest_tensor_gb"} go
into benchmarks/results/linear_cross_entropy-<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from mambakit.bench.common import LargestTensor, device_slug, format_table, save_rows, time_ms
from mambakit.ops import linear_cross_entropy
from mambakit.ops.linear_cross_entropy import reference

RESULTS = Path(__file__).parent / "results"


def cpu_ms(fn, repeats: int = 5) -> float:
    """Median wall milliseconds of fn() (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(loss_fn, hidden, weight, labels) -> dict:
    cuda = hidden.is_cuda
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        with autocast:
            loss = loss_fn(hidden, weight, labels)
        return torch.autograd.grad(loss, (hidden, weight))

    row = {"fwdbwd_ms": time_ms(step) if cuda else cpu_ms(step)}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    with LargestTensor() as spy:
        step()
    row["largest_tensor_gb"] = spy.largest_bytes / 1e9
    return row


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8 * 2048 if cuda else 2048)
    parser.add_argument("--d-model", type=int, default=768 if cuda else 128)
    parser.add_argument("--vocab", type=int, default=50280 if cuda else 8192)
    parser.add_argument("--chunk-sizes", default="1024,2048,4096,8192" if cuda else "256,512,1024",
                        help="comma-separated tokens per chunk")
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    hidden = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    weight = (torch.randn(args.vocab, args.d_model, device=device) / args.d_model**0.5).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    shape = {"tokens": args.tokens, "d_model": args.d_model, "vocab": args.vocab}
    rows = [{"path": "plain", "chunk_size": args.tokens, **shape,
             **measure(reference.linear_cross_entropy, hidden, weight, labels)}]
    for chunk in (int(c) for c in args.chunk_sizes.split(",")):
        fn = lambda h, w, y, chunk=chunk: linear_cross_entropy(h, w, y, chunk_size=chunk)  # noqa: E731
        rows.append({"path": "chunked", "chunk_size": chunk, **shape, **measure(fn, hidden, weight, labels)})
    print(format_table(rows, ["path", "chunk_size", "tokens", "vocab", "fwdbwd_ms", "peak_gb", "largest_tensor_gb"]))
    out = RESULTS / f"linear_cross_entropy-{device_slug()}.json"
    save_rows(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
