"""`mambakit serve`: an OpenAI-compatible HTTP server with continuous batching.

    mambakit serve --model runs/m2/latest --host 127.0.0.1 --port 8000 [--device cuda] [--max-batch 64]
    curl localhost:8000/v1/completions -d '{"prompt": "def fib(n):", "max_tokens": 64, "stream": true}'

Endpoints: /v1/completions, /v1/chat/completions (when the tokenizer has a chat template), /v1/models,
/health, /metrics (Prometheus). Requests beyond --max-batch wait in a queue of --max-queue jobs (then 429).
SIGTERM (or Ctrl-C) stops accepting, lets running requests finish for --drain-timeout seconds, exits 0.
Needs the `serve` extra: pip install "mambakit[serve]".
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from mambakit.cli.generate import add_model_arguments, add_state_dtype_argument, load_model, state_dtype


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model id of requests and /v1/models (default: the --model folder's name)")
    parser.add_argument("--chat-template", type=Path, metavar="FILE",
                        help="Jinja chat template, or a tokenizer_config.json holding one "
                             "(default: the checkpoint's tokenizer_config.json, if any)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=64, help="rows decoded together (64)")
    limits.add_argument("--max-queue", type=int, default=256,
                        help="choices waiting beyond --max-batch; more are answered 429 (256)")
    limits.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt accepted (4096)")
    limits.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens accepted (2048)")
    limits.add_argument("--prefill-chunk", type=int, default=2048, metavar="TOKENS",
                        help="prefill a longer prompt in pieces of this many tokens, bounding memory (2048)")
    limits.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long running requests may take to finish (30)")
    add_state_dtype_argument(parser)
    parser.add_argument("--cg", action=argparse.BooleanOptionalAction,
                        help="decode with CUDA graphs, one per bucket of batch sizes (default: on CUDA)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from mambakit.serving.chat import load_chat_template
        from mambakit.serving.server import ServerOptions, build_server
    except ImportError as e:
        print(f"mambakit serve: error: {e.name} is missing; install the serve extra: pip install 'mambakit[serve]'",
              file=sys.stderr)
        return 2
    try:
        threads = args.threads if args.threads is not None else torch.get_num_threads()
        options = ServerOptions(name=args.served_model_name or Path(os.path.abspath(args.model)).name, host=args.host,
                                port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                                max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                                prefill_chunk=args.prefill_chunk, drain_timeout=args.drain_timeout, cg=args.cg,
                                state_dtype=state_dtype(args), threads=threads)
        # The scheduler's thread runs the model with `threads`; this one loads it with one. OpenMP keeps a pool of
        # workers per thread that ran parallel work, and a second pool on the same cores slowed every step
        # (130M int8 on 2 cores: 27.9 ms a step off the main thread after it had used 2 threads, 20.9 on it).
        torch.set_num_threads(1)
        model, tokenizer = load_model(args, set_threads=False)
        template = load_chat_template(args.chat_template if args.chat_template is not None else args.model)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:  # bad flags, missing files, bad --device
        print(f"mambakit serve: error: {e}", file=sys.stderr)
        return 2
    server, scheduler = build_server(model, tokenizer, options, template)
    exit_on_signal = server.handle_exit

    def handle_exit(sig, frame):
        scheduler.accepting = False  # requests on kept-alive connections now get 503
        exit_on_signal(sig, frame)

    server.handle_exit = handle_exit
    # uvicorn re-raises the signal after its graceful shutdown: with these handlers that ends in exit 0.
    previous = {sig: signal.signal(sig, lambda sig, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    scheduler.start()
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind (it logged why)
        print(f"mambakit serve: error: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return int(e.code or 1)
    finally:
        scheduler.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
