"""Where one decode step's GPU time goes: the kernels of one `generate` step (the model's step, greedy
choice and bookkeeping) at the generation benchmark's shapes, per kernel name: launches and GPU
microseconds per step, from the torch profiler over eager steps; the step's wall time replayed as
the CUDA graph that `generate` uses; and the first token of `generate` after a 2048-token prompt (its
prefill): wall and GPU-busy time, the host ops that take the most time.

    python benchmarks/decode_profile.py --archs mamba,mamba2 --batches 1,64 --variants fused,unfused

Variants: "fused" as `generate` runs; "serial": the same graph without overlapped launches (no programmatic
dependent launch, `mambakit.ops._common.overlapped_launches`); "unfused" with
`mambakit.ops.norm_linear.MAX_FUSED_ROWS = 0` (the norms and the projections after them as separate
launches), for the side-by-side.

Rows {"arch", "shape", "batch", "variant", "graph_us", "gpu_us", "launches", "kernels": [{"name", "calls", "us"}],
"first_token": {"wall_ms", "gpu_ms", "host_ops", "python"}}
go to benchmarks/results/decode_profile-<gpu>.json (or --out; the file is replaced); a table per row is
printed last.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from generation_gpu import VOCAB, build  # noqa: E402  (the generation benchmark's models)
from mambakit._io import write_json  # noqa: E402
from mambakit.bench.common import device_slug, environment, format_table, gpu_kernel_times  # noqa: E402
from mambakit.generation import decoder as decoder_module  # noqa: E402
from mambakit.generation.decoder import get_decoder  # noqa: E402
from mambakit.ops import norm_linear  # noqa: E402
from mambakit.ops._common import overlapped_launches  # noqa: E402
from mambakit.generation.sampling import SamplingConfig  # noqa: E402

STEPS = 20  # profiled / timed steps
FUSED_ROWS = norm_linear.MAX_FUSED_ROWS


def step_kernels(decoder) -> tuple[list[dict], float, int]:
    """(kernels by GPU time, GPU us per step, launches per step) of STEPS eager steps."""
    decoder.advance()
    torch.cuda.synchronize()
    kernels, us, launches = gpu_kernel_times(decoder.advance, STEPS)
    return kernels, us, round(launches)


def first_token_profile(model, batch: int, prompt: int = 2048) -> dict:
    """`generate` of one token after a random prompt (the prefill inside `generate`): wall ms, the GPU's
    busy ms in it, and the host ops taking the most time (self CPU ms)."""
    ids = torch.randint(0, VOCAB, (batch, prompt), device="cuda")
    run = lambda: model.generate(ids, prompt + 1, cg=True)  # noqa: E731
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    wall = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
    host = sorted(({"name": e.key[:80], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000}
                   for e in events), key=lambda e: -e["self_cpu_ms"])
    gpu = sum(e.self_device_time_total for e in events) / 1000
    return dict(wall_ms=wall / 1000, gpu_ms=gpu, host_ops=host[:15], python=python_profile(run))


def python_profile(run) -> list[dict]:
    """The Python functions with the most own time in one call of `run` (cProfile, which the profiler's
    op table cannot show: argument checks, Triton's launcher, module calls)."""
    profiler = cProfile.Profile()
    profiler.runcall(run)
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own s, cumulative s, callers)}
    rows = [{"name": (name if file == "~" else f"{Path(file).parent.name}/{Path(file).name}:{line} {name}")[:80],
             "calls": calls, "own_ms": own * 1000, "cum_ms": cum * 1000}
            for (file, line, name), (_, calls, own, cum, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_ms"])[:25]


def graph_us(decoder) -> float:
    """Wall microseconds per replayed step."""
    for _ in range(3):
        decoder.advance()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(STEPS):
        decoder.advance()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / STEPS


@torch.no_grad()
def measure(arch: str, shape: str, batch: int, variant: str) -> dict:
    norm_linear.MAX_FUSED_ROWS = {"fused": FUSED_ROWS, "serial": FUSED_ROWS, "unfused": 0}[variant]
    model = build("mambakit", arch, shape, torch.float16)
    overlap = variant != "serial"
    with mock.patch.object(decoder_module, "overlapped_launches", lambda: overlapped_launches(overlap)):
        decoders = {graph: get_decoder(model, batch, 4096, 1024, VOCAB, 0, SamplingConfig(), None, None, graph=graph)
                    for graph in (False, True)}
    for decoder in decoders.values():
        decoder.cache.seqlen_offset = 1  # the mixers' one-token step
        decoder.buffers.budgets.fill_(decoder.buffers.sequence.shape[1])
    kernels, gpu, launches = step_kernels(decoders[False])
    return dict(arch=arch, shape=shape, batch=batch, variant=variant, graph_us=graph_us(decoders[True]), gpu_us=gpu,
                launches=launches, launches_per_layer=launches / model.config.n_layer, kernels=kernels,
                first_token=first_token_profile(model, batch))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="mamba,mamba2")
    parser.add_argument("--shapes", default="130m")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--variants", default="fused", help="comma-separated: fused, serial, unfused")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per row")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_profile: needs a CUDA GPU", file=sys.stderr)
        return 2
    out = args.out or Path(__file__).parent / "results" / f"decode_profile-{device_slug()}.json"
    rows = []
    for shape in args.shapes.split(","):
        for arch in args.archs.split(","):
            for batch in args.batches.split(","):
                for variant in args.variants.split(","):
                    rows.append(measure(arch, shape, int(batch), variant))
                    write_json(out, {"environment": environment(), "rows": rows})  # kept if a later row fails
    for row in rows:
        print(f"\n{row['arch']} {row['shape']} batch {row['batch']} {row['variant']}: "
              f"graph {row['graph_us']:.0f} us/step, GPU {row['gpu_us']:.0f} us, {row['launches']} launches "
              f"({row['launches_per_layer']:.1f}/layer)")
        print(format_table(row["kernels"][: args.top], ["name", "calls", "us"]))
        first = row["first_token"]
        print(f"first token after 2048 (prefill in generate): {first['wall_ms']:.1f} ms wall, GPU busy "
              f"{first['gpu_ms']:.1f} ms; host ops by self time:")
        print(format_table(first["host_ops"][: args.top], ["name", "calls", "self_cpu_ms"]))
        print("Python functions by own time (cProfile, one call):")
        print(format_table(first["python"], ["name", "calls", "own_ms", "cum_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
