"""`mambakit` command line: one module per sub-command, each with `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

# --dtype names shared by the commands that load a model (each adds its own meaning of "auto").
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Each name is a module `mambakit.cli.<name>` defining `register(subparsers)`; the parser it
# adds sets `func` to a callable taking the parsed args and returning an exit code.
COMMANDS = ("generate", "serve", "score", "convert", "train", "synth", "demo", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambakit",
        description="Mamba and Mamba-2 state space models: train, generate, serve, convert, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mambakit.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
