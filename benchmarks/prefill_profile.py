"""Where the prefill inside `generate` spends its GPU time, by kernel: the 130M shape (fp16, random weights) of
benchmarks/generation_gpu.py, one `generate` of a single token after `--batch` prompts of `--prompt` tokens
under the torch profiler, kernels summed by name.

    python benchmarks/prefill_profile.py --batch 128 --prompt 2048 --out prefill_profile.json

Prints the wall time, the kernels' total and the `--top` kernels per architecture; writes them as JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mambakit._io import write_json
from mambakit.bench.common import gpu_kernel_times

sys.path.insert(0, str(Path(__file__).parent))
from generation_gpu import VOCAB, build, wall_ms  # noqa: E402


@torch.no_grad()
def profile_prefill(arch: str, batch: int, prompt: int, top: int) -> dict:
    """{wall_ms, kernel_ms, top: [(kernel, calls, ms)]} of one generate(prompt + 1) after two warm-ups."""
    model = build("mambakit", arch, "130m", torch.float16)
    ids = torch.randint(0, VOCAB, (batch, prompt), device="cuda")
    run = lambda: model.generate(ids, prompt + 1, cg=True)  # noqa: E731
    for _ in range(2):  # compiles and captures
        run()
    wall = wall_ms(run, repeats=1)
    kernels, us, _ = gpu_kernel_times(run, repeats=1)
    return {"wall_ms": wall, "kernel_ms": us / 1e3,
            "top": [(k["name"], k["calls"], k["us"] / 1e3) for k in kernels[:top]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="mamba2,mamba")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--top", type=int, default=18, help="kernels listed per architecture")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    for arch in args.archs.split(","):
        results[arch] = profile_prefill(arch, args.batch, args.prompt, args.top)
        torch.cuda.empty_cache()
        print(f"== {arch} b{args.batch} prefill wall {results[arch]['wall_ms']:.1f} ms, "
              f"kernel total {results[arch]['kernel_ms']:.1f} ms")
        for name, calls, ms in results[arch]["top"]:
            print(f"{ms:8.2f} ms {calls:5g}  {name}")
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
