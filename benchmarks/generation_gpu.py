"""Generation on a GPU, side by side in one process: mambakit against the official `mamba_ssm` (`cg=True`)
and a same-size transformers Llama. The Mamba paper's protocol: random weights, prompt 2048, 128 greedy
tokens, fp16, throughput = batch x 128 / wall time of `generate`; decode ms per token at batch 1; peak
memory; and prefill tokens/s at long lengths (batch 1, bf16, forward to the last logits).

    python benchmarks/generation_gpu.py --archs mamba,mamba2 --batches 1,16,64,128 --impls mambakit,official,transformers
    python benchmarks/generation_gpu.py --prefill-lens 32768,131072,524288 --batches ''
    python benchmarks/generation_gpu.py --impls mambakit --state-dtypes float32,bfloat16   # SSM states in bf16

The official package is imported from the path given by --official (a built sdist, see
`mambakit.bench.selective_scan.build_official`). Rows go to benchmarks/results/generation_gpu-<gpu>.json
(or --out), merged with the rows already there after each measurement; a table is printed last.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.bench.common import device_slug, format_table, save_rows
from mambakit.generation import release_decoders

VOCAB = 50277
SHAPES = {"130m": dict(d_model=768, n_layer=24), "1.4b": dict(d_model=2048, n_layer=48)}
LLAMA = {"130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
         "1.4b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16)}


def mamba_config_fields(arch: str, shape: str) -> dict:
    layer = {"mamba": "Mamba1", "mamba2": "Mamba2"}[arch]
    return dict(**SHAPES[shape], vocab_size=VOCAB, ssm_cfg={"layer": layer}, rms_norm=True, residual_in_fp32=True,
                fused_add_norm=True, pad_vocab_size_multiple=8)


def build(impl: str, arch: str, shape: str, dtype: torch.dtype):
    """A random-weight model in eval mode on the GPU."""
    if impl == "mambakit":
        return MambaLMHeadModel(MambaConfig(**mamba_config_fields(arch, shape)), device="cuda", dtype=dtype).eval()
    if impl == "official":
        from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as OfficialModel

        fields = mamba_config_fields(arch, shape)
        fields["ssm_cfg"] = dict(fields["ssm_cfg"], use_mem_eff_path=False) if arch == "mamba2" else fields["ssm_cfg"]
        return OfficialModel(OfficialConfig(**fields), device="cuda", dtype=dtype).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, attn_implementation="sdpa", **LLAMA[shape])
    return LlamaForCausalLM(config).to("cuda", dtype).eval()


@torch.no_grad()
def generate_fn(impl: str, model, ids: torch.Tensor, new_tokens: int, state_dtype: torch.dtype = torch.float32):
    """A no-argument call that generates exactly `new_tokens` greedy tokens after `ids` (mambakit's SSM states
    in `state_dtype`)."""
    length = ids.shape[1] + new_tokens
    if impl == "mambakit":
        return lambda: model.generate(ids, length, cg=True, state_dtype=state_dtype)
    if impl == "official":
        return lambda: model.generate(ids, length, cg=True)
    return lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)


def wall_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure_generation(impl: str, arch: str, shape: str, model, batch: int, prompt: int, gen: int,
                       repeats: int, state_dtype: torch.dtype = torch.float32) -> dict:
    if impl == "mambakit":  # the decoders kept for the batch sizes measured before are not this one's memory
        release_decoders(model)
        gc.collect()
    ids = torch.randint(0, VOCAB, (batch, prompt), device="cuda")
    full, first = generate_fn(impl, model, ids, gen, state_dtype), generate_fn(impl, model, ids, 1, state_dtype)
    full(), first()  # warm-up: compiles, captures graphs
    torch.cuda.reset_peak_memory_stats()
    total_ms = wall_ms(full, repeats)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    prefill_ms = wall_ms(first, repeats)
    # rows of the default fp32 states keep the key they had before state_dtype was an option
    states = {} if state_dtype == torch.float32 else {"state_dtype": str(state_dtype).removeprefix("torch.")}
    return dict(impl=impl, arch=arch, shape=shape, batch=batch, prompt=prompt, gen=gen, **states,
                tok_s=batch * gen / total_ms * 1000, total_ms=total_ms, prefill_ms=prefill_ms,
                decode_ms=(total_ms - prefill_ms) / (gen - 1), peak_gb=peak_gb)


@torch.no_grad()
def measure_prefill(impl: str, arch: str, shape: str, model, length: int, repeats: int) -> dict:
    ids = torch.randint(0, VOCAB, (1, length), device="cuda")
    run = lambda: model(ids, num_last_tokens=1)  # noqa: E731
    run()
    torch.cuda.reset_peak_memory_stats()
    ms = wall_ms(run, repeats)
    return dict(impl=impl, arch=arch, shape=shape, batch=1, prefill_len=length, prefill_tok_s=length / ms * 1000,
                prefill_ms=ms, peak_gb=torch.cuda.max_memory_allocated() / 1e9)


@torch.no_grad()
def check_against_official(arch: str) -> dict:
    """Same weights in both: relative error of the prefill logits and greedy tokens shared; ours with and
    without CUDA graphs must agree exactly."""
    official = build("official", arch, "130m", torch.float16)
    ours = build("mambakit", arch, "130m", torch.float16)
    ours.load_state_dict(official.state_dict())
    ids = torch.randint(0, VOCAB, (4, 512), device="cuda")
    ref, got = official(ids).logits.float(), ours(ids).logits.float()
    graph, eager = ours.generate(ids, 512 + 64, cg=True), ours.generate(ids, 512 + 64, cg=False)
    theirs = official.generate(ids, 512 + 64, cg=True)
    same = (graph[:, 512:] == theirs[:, 512:]).cumprod(dim=1).sum(dim=1)  # leading tokens that agree, per row
    return dict(check="same weights as official", arch=arch, logits_err=float((got - ref).norm() / ref.norm()),
                graph_equals_eager=bool(torch.equal(graph, eager)),
                leading_tokens_equal_official=same.tolist())


GENERATION_COLUMNS = ["impl", "arch", "shape", "batch", "state_dtype", "tok_s", "decode_ms", "prefill_ms", "peak_gb"]
PREFILL_COLUMNS = ["impl", "arch", "shape", "prefill_len", "prefill_tok_s", "peak_gb"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="mamba,mamba2")
    parser.add_argument("--impls", default="mambakit,official,transformers")
    parser.add_argument("--shapes", default="130m")
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--state-dtypes", default="float32",
                        help="comma-separated dtypes of mambakit's SSM states (generate's state_dtype)")
    parser.add_argument("--prefill-lens", default="", help="comma-separated lengths (batch 1, bf16)")
    parser.add_argument("--check", action="store_true", help="compare with the official model first")
    parser.add_argument("--official", help="folder holding the built official mamba_ssm (put on sys.path)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.official:
        sys.path.insert(0, args.official)
    out = args.out or Path("benchmarks/results") / f"generation_gpu-{device_slug()}.json"
    rows = []

    def record(row: dict) -> None:
        print(row, flush=True)
        rows.append(row)
        save_rows(out, [row])

    impls, archs = args.impls.split(","), args.archs.split(",")
    state_dtype_args = [getattr(torch, name) for name in args.state_dtypes.split(",")]
    if args.check:
        for arch in archs:
            record(check_against_official(arch))
        gc.collect()  # the check's models must not count in the peak memory measured next
        torch.cuda.empty_cache()
    for shape in args.shapes.split(","):
        for impl in impls:
            for arch in (["llama"] if impl == "transformers" else archs):
                model = build(impl, arch, shape, torch.float16)
                state_dtypes = state_dtype_args if impl == "mambakit" else [torch.float32]
                for batch, state_dtype in itertools.product([int(b) for b in args.batches.split(",") if b],
                                                            state_dtypes):
                    try:
                        row = measure_generation(impl, arch, shape, model, batch, args.prompt, args.gen, args.repeats,
                                                 state_dtype)
                    except torch.OutOfMemoryError:
                        row = dict(impl=impl, arch=arch, shape=shape, batch=batch, oom=True)
                    record(row)
                del model
                gc.collect()  # what a reference cycle still holds must not count in the next model's peak
                torch.cuda.empty_cache()
    for impl in [i for i in impls if i != "transformers"]:
        for arch in archs:
            model = build(impl, arch, "130m", torch.bfloat16)
            for length in [int(n) for n in args.prefill_lens.split(",") if n]:
                record(measure_prefill(impl, arch, shape, model, length, args.repeats))
            del model
            torch.cuda.empty_cache()
    print(format_table([r for r in rows if "tok_s" in r], GENERATION_COLUMNS))
    print(format_table([r for r in rows if "prefill_tok_s" in r], PREFILL_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
