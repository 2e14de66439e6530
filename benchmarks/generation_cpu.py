"""CPU generation speed at the 130M shape (24 layers, d_model 768, vocab 50280), random weights, fp32,
batch 1: prefill tokens/s over the prompt and greedy decode tokens/s, ours and `transformers`'
Mamba / Mamba-2 (pure-PyTorch path) side by side in one process.

    python benchmarks/generation_cpu.py --prompt-len 512 --new-tokens 32

Rows are merged into benchmarks/results/generation-cpu.json and a table is printed last.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.bench.common import format_table, save_rows
from mambakit.generation import iterate_tokens

COLUMNS = ["model", "impl", "threads", "prompt_len", "new_tokens", "prefill_tok_s", "decode_tok_s", "load"]
SHAPE = dict(d_model=768, n_layer=24, vocab_size=50280)
SSM_CFG = {"mamba1": {"layer": "Mamba1"}, "mamba2": {"layer": "Mamba2", "d_state": 128, "headdim": 64}}


def speeds(stamps: list[float], prompt_len: int) -> dict:
    """Figures from the start time and the time each token came out: the first token closes the
    prefill; each later one is one decode step."""
    prefill_s, decode_s = stamps[1] - stamps[0], stamps[-1] - stamps[1]
    return {"prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": (len(stamps) - 2) / decode_s}


def ours(kind: str, prompt: torch.Tensor, new_tokens: int) -> dict:
    model = MambaLMHeadModel(MambaConfig(ssm_cfg=SSM_CFG[kind], **SHAPE)).eval()
    stamps = [time.perf_counter()]
    for _ in iterate_tokens(model, [prompt[0]], max_new_tokens=new_tokens):
        stamps.append(time.perf_counter())
    return speeds(stamps, prompt.shape[1])


def transformers_baseline(kind: str, prompt: torch.Tensor, new_tokens: int) -> dict:
    import transformers
    from transformers import LogitsProcessor

    class Stamps(LogitsProcessor):
        """Called once per generated token, right after the forward that produced its logits."""

        def __init__(self):
            self.times = [time.perf_counter()]

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    if kind == "mamba1":
        config = transformers.MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280)
        model = transformers.MambaForCausalLM(config)
    else:
        config = transformers.Mamba2Config(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=128,
                                           head_dim=64, num_heads=24, n_groups=1, expand=2)
        model = transformers.Mamba2ForCausalLM(config)
    model.eval()
    stamps = Stamps()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=[stamps], attention_mask=torch.ones_like(prompt))
    return speeds(stamps.times, prompt.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--models", default="mamba1,mamba2")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generation-cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, args.prompt_len))
    impls = {"mambakit": ours} if args.no_baseline else {"mambakit": ours, "transformers": transformers_baseline}
    rows = []
    for kind in args.models.split(","):
        for impl, run in impls.items():
            row = {"model": kind, "impl": impl, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "dtype": "float32", "batch": 1, "threads": torch.get_num_threads()}
            row.update(run(kind, prompt, args.new_tokens))
            # Other jobs on a shared machine slow everything: record the load beside the figures.
            row["load"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(format_table([row], COLUMNS), flush=True)
    save_rows(args.out, rows)
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
