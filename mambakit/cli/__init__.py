"""`mambakit` command line: one module per sub-command, each with `register(subparsers)`.

Errors a user can fix (bad values, missing or unwritable files, a full disk, a run that diverged) end
as one line on stderr and a non-zero exit; Ctrl-C exits 130; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

# --dtype names shared by the commands that load a model (each adds its own meaning of "auto").
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Each name is a module `mambakit.cli.<name>` defining `register(subparsers)`; the parser it
# adds sets `func` to a callable taking the parsed args and returning an exit code.
COMMANDS = ("generate", "serve", "score", "convert", "train", "synth", "demo", "bench")

# Exceptions that report a problem with the input or the machine, not a bug: (types, exit code).
USER_ERRORS = ((ValueError, OSError, torch.OutOfMemoryError), 2)
DIVERGED = (FloatingPointError, 1)  # training stopped on a non-finite loss


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mambakit",
        description="Mamba and Mamba-2 state space models: train, generate, serve, convert, benchmark.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mambakit.cli.{name}").register(sub)
    for command in sub.choices.values():  # `mambakit train ... --debug` works as well as `mambakit --debug train`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"mambakit {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (*USER_ERRORS[0], DIVERGED[0]) as err:
        if args.debug:
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return DIVERGED[1] if isinstance(err, DIVERGED[0]) else USER_ERRORS[1]


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (an OSError as its text and path, as `open` would say it)."""
    if isinstance(err, OSError) and err.strerror:  # without the "[Errno N]" of str(err)
        text = err.strerror + (f": {err.filename}" if err.filename is not None else "")
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
