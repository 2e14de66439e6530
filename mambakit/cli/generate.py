"""`mambakit generate`: stream a model's continuation of a prompt to the terminal.

    mambakit generate --model path/to/ckpt --prompt "def fibonacci(n):" --max-new-tokens 200 --top-p 0.9

The tokenizer saved beside the checkpoint is used unless --tokenizer says otherwise. The prompt comes
from --prompt, --prompt-file or stdin; speed goes to stderr at the end.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from mambakit.cli import DTYPES



def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a checkpoint", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_text_arguments(parser, "prompt")
    group = parser.add_argument_group("sampling (greedy unless one of temperature/top-k/top-p/min-p is given; "
                                      "then top-k defaults to no limit)")
    group.add_argument("--max-new-tokens", type=int, default=200)
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--min-p", type=float)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, help="same seed, same output (default: random)")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop once this text appears (repeatable)")
    group.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                       help="stop at this token (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    parser.add_argument("--no-echo", action="store_true", help="print only the new text, not the prompt")
    parser.add_argument("--prefill-chunk", type=int, default=8192, metavar="TOKENS",
                        help="prefill a longer prompt in pieces of this many tokens, bounding memory (8192)")
    add_state_dtype_argument(parser)
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile where the step runs eagerly (the CPU): faster tokens "
                             "after a first compilation of tens of seconds (needs a C++ compiler)")
    parser.set_defaults(func=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="checkpoint directory (official or transformers layout)")
    parser.add_argument("--tokenizer",
                        help="tokenizer.json, a directory holding one, or 'byte' (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", metavar="{auto,float32,bfloat16,float16}",
                        help="weights and activations (states stay float32); auto: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--quantize", metavar="{int8}",
                        help="int8: weight-only int8 linear layers, applied in memory at load time (CPU only; "
                             "the checkpoint is not changed)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="on the CPU, keep float32/bfloat16 linear layers as they are instead of holding their "
                             "weights in oneDNN's prepacked layout (same results, faster matmuls; in memory only; never "
                             "with --compile, whose step streams the plain weights)")


def add_text_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(f"--{name}", help=f"the {name} text (default: read stdin)")
    source.add_argument(f"--{name}-file", type=Path, help=f"read the {name} from this file")


def read_text(args: argparse.Namespace, name: str) -> str:
    """The text given by --NAME, --NAME-file, or stdin when it is not a terminal."""
    text, path = getattr(args, name), getattr(args, f"{name}_file")
    if text is not None:
        return text
    if path is not None:
        return path.read_text(encoding="utf-8")
    if sys.stdin.isatty():
        raise ValueError(f"--{name}: give --{name}, --{name}-file, or pipe the text into stdin")
    return sys.stdin.read()


def add_state_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--state-dtype, read back by `state_dtype(args)`."""
    parser.add_argument("--state-dtype", default="float32", metavar="{float32,bfloat16,float16}",
                        help="dtype of the SSM states while decoding: bfloat16 / float16 halve the bytes a step "
                             "moves (most of them at large batch on the GPU), the math stays fp32 (float32)")


def state_dtype(args: argparse.Namespace) -> torch.dtype:
    """--state-dtype as a torch dtype; a ValueError naming the flag if it is not one of DTYPES."""
    if args.state_dtype not in DTYPES:
        raise ValueError(f"--state-dtype: expected one of {list(DTYPES)}, got {args.state_dtype!r}")
    return DTYPES[args.state_dtype]


def load_model(args: argparse.Namespace, set_threads: bool = True):
    """(model in eval mode on args.device, tokenizer) from --model, --tokenizer, --device, --dtype, --quantize,
    --threads, --no-prepack (and generate's --compile). set_threads=False: --threads is checked, not applied
    (serve applies it on the thread that runs the model)."""
    from mambakit.models import MambaLMHeadModel
    from mambakit.prepacking import PACKED_DTYPES, prepack, prepack_available
    from mambakit.quantization import QUANTIZE_CHOICES, quantize
    from mambakit.tokenizer import load_tokenizer
    from mambakit.training.distributed import check_device

    if args.dtype != "auto" and args.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {['auto', *DTYPES]}, got {args.dtype!r}")
    if args.quantize is not None and args.quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize: expected one of {list(QUANTIZE_CHOICES)}, got {args.quantize!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
        if set_threads:
            torch.set_num_threads(args.threads)
    device = check_device(args.device)
    if args.quantize is not None and device.type != "cpu":
        raise ValueError(f"--quantize: {args.quantize} weight-only quantization runs on the CPU, got --device {device}")
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = MambaLMHeadModel.from_pretrained(args.model, device=device, dtype=dtype).eval()
    if args.quantize is not None:
        quantize(model, args.quantize)
    # A compiled decode step streams the plain weights itself (ops/rowwise_linear), faster than packed products.
    compiled = getattr(args, "compile", False)
    if device.type == "cpu" and dtype in PACKED_DTYPES and not (args.no_prepack or compiled) and prepack_available():
        prepack(model)  # lossless: whatever quantize left in floating point
    return model, load_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)


def sampling_options(args: argparse.Namespace) -> dict:
    """generate()'s sampling keywords from the flags: greedy unless a sampling flag is given (then top_k
    defaults to no limit), since generate() itself is greedy unless top_k != 1 (the official rule)."""
    sampling_asked = any(v is not None for v in (args.temperature, args.top_k, args.top_p, args.min_p))
    top_k = args.top_k if args.top_k is not None else 0 if sampling_asked else 1
    return dict(temperature=1.0 if args.temperature is None else args.temperature, top_k=top_k,
                top_p=0.0 if args.top_p is None else args.top_p, min_p=0.0 if args.min_p is None else args.min_p,
                repetition_penalty=args.repetition_penalty)


def run(args: argparse.Namespace) -> int:
    from mambakit.generation import GenerationOptions, SamplingConfig
    from mambakit.generation.generate import decode_steps, prompt_rows
    from mambakit.generation.stream import stream_text

    try:
        # Fail on bad sampling flags before loading the model.
        for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--prefill-chunk", args.prefill_chunk)):
            if value < 1:
                raise ValueError(f"{flag}: expected an int >= 1, got {value}")
        sampling = sampling_options(args)
        SamplingConfig(**sampling)
        states = state_dtype(args)
        prompt = read_text(args, "prompt")
        model, tokenizer = load_model(args)
        config = GenerationOptions(max_new_tokens=args.max_new_tokens, seed=args.seed,
                                   eos_token_id=[] if args.ignore_eos else None, stop_token_ids=args.stop_token_id,
                                   stop_strings=args.stop, tokenizer=tokenizer, prefill_chunk=args.prefill_chunk,
                                   compile=args.compile, state_dtype=states, **sampling)
        prompts = prompt_rows([tokenizer.encode(prompt)], next(model.parameters()).device)
        stop_ids = config.stop_ids(prompts[0].device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input, missing files, unusable --device
        print(f"mambakit generate: error: {e}", file=sys.stderr)
        return 2
    steps = decode_steps(model, prompts, config)
    clock = StepClock()
    if not args.no_echo:
        sys.stdout.write(prompt)
    for piece in stream_text(clock.timed(steps), tokenizer, stop_ids):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(clock.summary(len(prompts[0])), file=sys.stderr)
    return 0


class StepClock:
    """Times the prefill (up to the first token) and the decode steps of an `iterate_tokens` stream."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = self.end = self.start
        self.tokens = 0

    def timed(self, steps: Iterable) -> Iterator:
        for step in steps:
            self.end = time.perf_counter()
            if self.tokens == 0:
                self.first = self.end
            self.tokens += int(step.active.sum())
            yield step

    def summary(self, prompt_tokens: int) -> str:
        prefill, decode = self.first - self.start, self.end - self.first
        line = f"prompt: {prompt_tokens} tokens in {prefill:.2f} s ({prompt_tokens / max(prefill, 1e-9):.1f} tok/s)"
        if self.tokens > 1:
            speed = (self.tokens - 1) / max(decode, 1e-9)
            line += f"; generated: {self.tokens} tokens, {speed:.1f} tok/s after the first"
        return line
