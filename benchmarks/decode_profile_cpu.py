"""Where one CPU decode step's time goes: a `Decoder` step (the model's step and the greedy choice) of the
CPU generation benchmark's models and variants, timed without a profiler, then per aten op (torch profiler,
CPU activity: calls and self microseconds per step, the matrix products summed apart from the rest) and per
Python function (cProfile).

    python benchmarks/decode_profile_cpu.py --threads 2 --models mamba1,mamba2 --batches 1 \
        --variants bfloat16,bfloat16-compiled,int8-compiled

Rows {"model", "shape", "variant", "batch", "threads", "step_us", "step_runs_us", "matmul_us", "other_us",
"ops_per_step", "ops": [{"name", "calls", "us"}], "python": [{"name", "calls", "own_us", "cum_us"}]} (per step)
go to benchmarks/results/decode_profile-cpu.json (or --out; the file is replaced); tables are printed last.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from generation_cpu import SHAPES, SSM_CFG, VARIANTS, VOCAB  # noqa: E402  (the CPU generation benchmark's rows)
from mambakit import MambaConfig, MambaLMHeadModel, prepack, quantize  # noqa: E402
from mambakit._io import write_json  # noqa: E402
from mambakit.bench.common import environment, format_table  # noqa: E402
from mambakit.generation.decoder import get_decoder  # noqa: E402
from mambakit.generation.sampling import SamplingConfig  # noqa: E402

STEPS = 20  # timed / profiled steps
# The aten ops that read the weights (the matrix products); the rest is the per-token overhead.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise",
              "aten::mkldnn_rnn_layer", "mkldnn::_linear_pointwise.binary", "aten::_mkl_linear", "mkl::_mkl_linear")


def build(kind: str, shape: str, variant: str) -> MambaLMHeadModel:
    dtype, method, packed, _ = VARIANTS[variant]
    torch.manual_seed(0)
    config = MambaConfig(ssm_cfg=SSM_CFG[kind], vocab_size=VOCAB, **SHAPES[shape])
    model = MambaLMHeadModel(config, dtype=getattr(torch, dtype)).eval()
    if method is not None:
        quantize(model, method)
    if packed:
        prepack(model)
    return model


def step_us(step, repeats: int = 3) -> list[float]:
    """Wall microseconds per step, each of `repeats` runs of STEPS steps."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(STEPS):
            step()
        runs.append((time.perf_counter() - start) * 1e6 / STEPS)
    return runs


def op_table(step) -> list[dict]:
    """aten ops of one step by self CPU time: calls and microseconds per step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(STEPS):
            step()
    ops = [{"name": e.key[:70], "calls": e.count / STEPS, "us": e.self_cpu_time_total / STEPS}
           for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return sorted(ops, key=lambda op: -op["us"])


def python_table(step, top: int = 25) -> list[dict]:
    """Python functions by own time per step (cProfile): module calls, argument checks, dispatch."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [step() for _ in range(STEPS)])
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own s, cumulative s, callers)}
    rows = [{"name": (name if file == "~" else f"{Path(file).parent.name}/{Path(file).name}:{line} {name}")[:80],
             "calls": calls / STEPS, "own_us": own * 1e6 / STEPS, "cum_us": cum * 1e6 / STEPS}
            for (file, line, name), (_, calls, own, cum, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


@torch.no_grad()
def measure(kind: str, shape: str, variant: str, batch: int, threads: int) -> dict:
    model = build(kind, shape, variant)
    compiled = VARIANTS[variant][3]
    decoder = get_decoder(model, batch, 4096, 1024, VOCAB, 0, SamplingConfig(), None, None, graph=False,
                          compiled=compiled)
    decoder.cache.seqlen_offset = 1  # the mixers' one-token step (the states are zeros: speed is the same)
    decoder.buffers.budgets.fill_(decoder.buffers.sequence.shape[1])

    def step():
        decoder.advance()
        decoder.buffers.step.zero_()  # the buffers hold a bounded number of steps

    for _ in range(3):  # compiles, on the first call, when compiled
        step()
    runs = step_us(step)
    ops = op_table(step)
    matmul = sum(op["us"] for op in ops if op["name"] in MATMUL_OPS)
    return dict(model=kind, shape=shape, variant=variant, batch=batch, threads=threads,
                load_before=round(os.getloadavg()[0], 2), step_us=statistics.median(runs),
                step_runs_us=[round(r) for r in runs], matmul_us=matmul,
                other_us=sum(op["us"] for op in ops) - matmul, ops_per_step=sum(op["calls"] for op in ops),
                ops=ops[:40], python=python_table(step))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mamba1,mamba2")
    parser.add_argument("--shapes", default="130m", help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--variants", default="bfloat16,bfloat16-compiled,int8,int8-compiled",
                        help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--top", type=int, default=15, help="ops and functions listed per row")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_profile-cpu.json")
    args = parser.parse_args(argv)
    for name, listed, known in (("variants", args.variants, VARIANTS), ("models", args.models, SSM_CFG),
                                ("shapes", args.shapes, SHAPES)):
        unknown = sorted(set(listed.split(",")) - set(known))
        if unknown:
            parser.error(f"--{name}: unknown {unknown}, expected some of {list(known)}")
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        for kind in args.models.split(","):
            for batch in map(int, args.batches.split(",")):
                for variant in args.variants.split(","):
                    rows.append(measure(kind, shape, variant, batch, args.threads))
                    write_json(args.out, {"environment": environment(), "rows": rows})  # kept if a later row fails
    for row in rows:
        print(f"\n{row['model']} {row['shape']} {row['variant']} batch {row['batch']}: {row['step_us']:.0f} us/step "
              f"(runs {row['step_runs_us']}, load {row['load_before']}); profiled: matmuls {row['matmul_us']:.0f} us, "
              f"other ops {row['other_us']:.0f} us, {row['ops_per_step']:.0f} ops")
        print(format_table(row["ops"][: args.top], ["name", "calls", "us"]))
        print(format_table(row["python"][: args.top], ["name", "calls", "own_us", "cum_us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
