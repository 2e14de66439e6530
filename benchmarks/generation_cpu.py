"""CPU generation speed, ours and `transformers`' Mamba / Mamba-2 side by side in one run: the same random
weights (saved once with `save_pretrained(format="hf")`, loaded by both), greedy decoding, fp32, bf16 and
int8 weight-only (ours), batch 1 and 8. Ours runs as `mambakit generate` does on the CPU: floating-point
linear layers prepacked for oneDNN (`mambakit.prepack`); the `-plain` variants leave them as they are, the
`-compiled` ones decode through torch.compile (`generate(compile=True)`, prepacked, as `--compile` runs).
Every row runs in a fresh process, so that its resident memory is its own; the machine's memory bandwidth
is measured first, and again just before and after each row (it moves with the other jobs on a shared
machine), and each decode speed is set against the floor the best of the row's two reads implies (decode
reads every weight once per step: floor = bandwidth / weight bytes per step).

    python benchmarks/generation_cpu.py --threads 2 --prompt-len 128 --new-tokens 32
    python benchmarks/generation_cpu.py --shapes 370m,1.4b --models mamba2 --batches 1 --no-baseline
    python benchmarks/generation_cpu.py --quality runs/tiny   # validation bits per byte, bf16 / int8 vs fp32

Rows are merged into benchmarks/results/generation-cpu.json and a table is printed last.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mambakit import MambaConfig, MambaLMHeadModel, prepack, quantize
from mambakit.bench.common import format_table, save_rows
from mambakit.generation import iterate_tokens

COLUMNS = ["model", "shape", "impl", "dtype", "quantize", "prepack", "compile", "batch", "prefill_tok_s",
           "decode_tok_s", "floor_tok_s", "floor_fraction", "rss_gb", "load"]
QUALITY_COLUMNS = ["model", "dtype", "quantize", "val_bpb", "bpb_err", "greedy_same_as_fp32"]
VOCAB = 50280
SHAPES = {"130m": dict(d_model=768, n_layer=24), "370m": dict(d_model=1024, n_layer=48),
          "1.4b": dict(d_model=2048, n_layer=48)}
SSM_CFG = {"mamba1": {"layer": "Mamba1"}, "mamba2": {"layer": "Mamba2", "d_state": 128, "headdim": 64}}
# (dtype, quantize, prepack, compile) per variant, compiled ones unpacked as the CLI runs them (their step streams
# the plain weights, ops/rowwise_linear); transformers runs float32 and bfloat16 (never prepacked).
VARIANTS = {"float32": ("float32", None, True, False), "bfloat16": ("bfloat16", None, True, False),
            "int8": ("bfloat16", "int8", True, False), "float32-plain": ("float32", None, False, False),
            "bfloat16-plain": ("bfloat16", None, False, False), "float32-compiled": ("float32", None, False, True),
            "bfloat16-compiled": ("bfloat16", None, False, True), "int8-compiled": ("bfloat16", "int8", False, True)}
DEFAULT_VARIANTS = ("float32", "bfloat16", "int8")
BASELINE_VARIANTS = ("float32", "bfloat16")
WARMUP_PROMPT, WARMUP_TOKENS = 16, 4


# ---------------------------------------------------------------------------------------------
# the machine


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_bandwidth() -> float:
    """GB/s of a 1 GiB read (a sum), with torch's current threads."""
    x = torch.ones(2**28)
    return x.numel() * 4 / best_seconds(x.sum) / 1e9


def memory_bandwidth() -> dict:
    """GB/s of a 1 GiB read (a sum), a 1 GiB copy (read + write counted) and a 768 x 50280 fp32
    matrix-vector product (the 130M LM head), with torch's current threads."""
    x, y = torch.ones(2**28), torch.empty(2**28)
    head, vector = torch.randn(VOCAB, 768), torch.randn(768)
    return {"read_gbs": read_bandwidth(),
            "copy_gbs": 2 * x.numel() * 4 / best_seconds(lambda: y.copy_(x)) / 1e9,
            "matvec_gbs": head.numel() * 4 / best_seconds(lambda: head @ vector, repeats=20) / 1e9}


def resident_gb() -> dict:
    """This process's resident memory in GB: all of it (rss_gb, shared library pages included, which the
    kernel may drop), its anonymous part (anon_rss_gb: weights, states, buffers) and the peak (peak_rss_gb).
    Freed heap pages are handed back first."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the figures may then include freed pages
        pass
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    kb = {name: int(fields[name].split()[0]) for name in ("VmRSS", "RssAnon")}
    return {"rss_gb": kb["VmRSS"] / 1e6, "anon_rss_gb": kb["RssAnon"] / 1e6,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def weight_bytes_per_step(model: torch.nn.Module, embedding: torch.Tensor) -> int:
    """Bytes of the weights one decode step reads: every parameter and buffer once, except the
    embedding table (one row per token), unless the LM head is that same table."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # a tied weight is one parameter
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    head = model.lm_head
    tied = isinstance(head, torch.nn.Linear) and head.weight is embedding
    return total if tied else total - embedding.numel() * embedding.element_size()


# ---------------------------------------------------------------------------------------------
# one measurement (run in a child process)


def speeds(runs: list[list[float]], batch: int, prompt_len: int) -> dict:
    """Figures from each run's start time and the time each token came out: the first token closes the
    prefill; each later one is one decode step of every row. Medians over the runs (a shared machine's
    other jobs slow some of them), with every run's decode figure beside them."""
    prefill = [batch * prompt_len / (stamps[1] - stamps[0]) for stamps in runs]
    decode = [batch * (len(stamps) - 2) / (stamps[-1] - stamps[1]) for stamps in runs]
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "decode_runs_tok_s": [round(d, 2) for d in decode]}


def ours(directory: Path, dtype: torch.dtype, method: str | None, packed: bool, compiled: bool,
         prompt: torch.Tensor, new_tokens: int, repeats: int):
    model = MambaLMHeadModel.from_pretrained(directory, dtype=dtype).eval()
    if method is not None:
        quantize(model, method)
    if packed:
        prepack(model)

    def run(ids, n):
        stamps = [time.perf_counter()]
        for _ in iterate_tokens(model, list(ids), max_new_tokens=n, compile=compiled):
            stamps.append(time.perf_counter())
        return stamps

    # A compiled decode step is compiled for the timed runs' shapes (the warm-up's decoder is theirs).
    run(prompt, new_tokens) if compiled else run(prompt[:, :WARMUP_PROMPT], WARMUP_TOKENS)
    runs = [run(prompt, new_tokens) for _ in range(repeats)]
    return runs, weight_bytes_per_step(model, model.backbone.embedding.weight), resident_gb()  # model alive


def transformers_baseline(directory: Path, dtype: torch.dtype, method: str | None, packed: bool, compiled: bool,
                          prompt: torch.Tensor, new_tokens: int, repeats: int):
    import transformers
    from transformers import LogitsProcessor

    class Stamps(LogitsProcessor):
        """Called once per generated token, right after the forward that produced its logits."""

        def __init__(self):
            self.times = [time.perf_counter()]

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    config = json.loads((directory / "config.json").read_text())
    cls = transformers.MambaForCausalLM if config["model_type"] == "mamba" else transformers.Mamba2ForCausalLM
    model = cls.from_pretrained(directory, dtype=dtype).eval()

    def run(ids, n):
        stamps = Stamps()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, logits_processor=[stamps],
                           attention_mask=torch.ones_like(ids))
        return stamps.times

    run(prompt[:, :WARMUP_PROMPT], WARMUP_TOKENS)
    runs = [run(prompt, new_tokens) for _ in range(repeats)]
    return runs, weight_bytes_per_step(model, model.backbone.embeddings.weight), resident_gb()  # model alive


IMPLS = {"mambakit": ours, "transformers": transformers_baseline}


def measure(spec: dict) -> dict:
    """The figures of one row: spec holds directory, impl, dtype, quantize, prepack, compile, batch, prompt_len,
    new_tokens, repeats, threads."""
    torch.set_num_threads(spec["threads"])
    prompt = torch.randint(0, VOCAB, (spec["batch"], spec["prompt_len"]), generator=torch.Generator().manual_seed(0))
    runs, weight_bytes, memory = IMPLS[spec["impl"]](Path(spec["directory"]), getattr(torch, spec["dtype"]),
                                             spec["quantize"], spec["prepack"], spec["compile"], prompt,
                                             spec["new_tokens"], spec["repeats"])
    # Probed once the memory figures are taken (its 1 GiB must not count in them), as soon as decoding ends.
    return {**speeds(runs, spec["batch"], spec["prompt_len"]), "weights_gb": weight_bytes / 1e9, **memory,
            "after_read_gbs": read_bandwidth()}


def in_child(spec: dict) -> dict:
    """`measure(spec)` in a fresh Python process (its resident memory is this row's alone)."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['impl']} {spec['dtype']} batch {spec['batch']} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# quality


def quality_rows(run_dir: Path, prompts: int = 8, prompt_len: int = 64, new_tokens: int = 32) -> list[dict]:
    """Validation bits per byte of the run's latest checkpoint in fp32, bf16 and int8 (the trainer's own
    evaluation: the same held-out windows of its corpus), and the share of greedy tokens equal to fp32's
    (`new_tokens` after each of `prompts` validation prompts)."""
    import copy

    from mambakit.generation import generate
    from mambakit.training.trainer import Trainer

    trainer = Trainer.resume(run_dir, quiet=True, device="cpu")
    fp32 = trainer.model.eval()
    prompt = next(iter(trainer.dataset.val_batches(prompts, prompts))).input_ids[:, :prompt_len]
    reference = generate(fp32, prompt, max_length=prompt_len + new_tokens)[:, prompt_len:]
    rows = []
    for dtype, method in (("float32", None), ("bfloat16", None), ("float32", "int8"), ("bfloat16", "int8")):
        model = copy.deepcopy(fp32).to(getattr(torch, dtype))
        trainer.model = quantize(model, method) if method else model
        greedy = generate(trainer.model, prompt, max_length=prompt_len + new_tokens)[:, prompt_len:]
        rows.append({"model": f"{trainer.config.arch} d{trainer.config.d_model}x{trainer.config.n_layer} trained",
                     "impl": "mambakit", "dtype": dtype, "quantize": method, "run": str(run_dir),
                     "val_bpb": trainer.evaluate()["val_bpb"],
                     "greedy_same_as_fp32": float((greedy == reference).float().mean())})
    for row in rows:
        row["bpb_err"] = row["val_bpb"] / rows[0]["val_bpb"] - 1  # relative to fp32
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--models", default="mamba1,mamba2")
    parser.add_argument("--shapes", default="130m", help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (medians are reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--quality", type=Path, metavar="RUN", help="instead: bits per byte of a `mambakit train` run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generation-cpu.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    if args.quality is not None:
        rows = quality_rows(args.quality)
        save_rows(args.out, rows)
        print(format_table(rows, QUALITY_COLUMNS))
        return
    bandwidth = memory_bandwidth()
    print(", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        for kind in args.models.split(","):
            with tempfile.TemporaryDirectory() as directory:
                torch.manual_seed(0)
                config = MambaConfig(ssm_cfg=SSM_CFG[kind], vocab_size=VOCAB, **SHAPES[shape])
                MambaLMHeadModel(config).save_pretrained(directory, format="hf")  # the weights both load
                runs = [("mambakit", v) for v in args.variants.split(",")]
                if not args.no_baseline:
                    runs += [("transformers", v) for v in BASELINE_VARIANTS if v in args.variants.split(",")]
                for batch in map(int, args.batches.split(",")):
                    for impl, variant in runs:
                        dtype, method, packed, compiled = VARIANTS[variant]
                        spec = {"impl": impl, "dtype": dtype, "quantize": method, "batch": batch,
                                "prepack": packed and impl == "mambakit", "compile": compiled and impl == "mambakit",
                                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                                "threads": args.threads}
                        load_before = round(os.getloadavg()[0], 2)
                        read_before = read_bandwidth()
                        row = {"model": kind, "shape": shape, **spec, **in_child({**spec, "directory": directory})}
                        row.update(bandwidth)
                        # A shared machine's DRAM bandwidth moves with its neighbours' load (a 1 GiB sum here has
                        # read 33-58 GB/s): the floor takes the best read probed just before and after the row.
                        row["before_read_gbs"] = read_before
                        row["row_read_gbs"] = max(read_before, row["after_read_gbs"])
                        row["floor_tok_s"] = batch * row["row_read_gbs"] / row["weights_gb"]
                        row["floor_fraction"] = row["decode_tok_s"] / row["floor_tok_s"]
                        # Other jobs on a shared machine slow everything: record the load beside the figures.
                        row["load_before"], row["load"] = load_before, round(os.getloadavg()[0], 2)
                        rows.append(row)
                        print(format_table([row], COLUMNS), flush=True)
    save_rows(args.out, rows)
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
