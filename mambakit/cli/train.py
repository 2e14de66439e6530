"""`mambakit train`: pre-train a language model on text files, on one process or many (torchrun).

    mambakit train --data corpus/ --arch mamba2 --d-model 512 --n-layer 8 --seq-len 1024 \\
        --batch-size 16 --max-tokens 200M --out runs/m2
    mambakit train --resume runs/m2                        # continues exactly where it stopped
    torchrun --nproc-per-node 8 -m mambakit train ...      # the same run on 8 GPUs

Exit status: 0 trained (or stopped by --max-time or SIGTERM, saved), 1 the loss became NaN or infinite
(nothing non-finite saved), 2 bad input (one line on stderr), 130 Ctrl-C (saved first).
"""
from __future__ import annotations

import argparse
import json

from mambakit.training.config import ARCHS, TrainConfig, parse_count


def int_list(text: str) -> list[int]:
    """'1,3' -> [1, 3]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,3, got {text!r}") from None


def count(text: str) -> int:
    """parse_count for argparse."""
    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def json_object(text: str) -> dict:
    """A JSON object for argparse."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


# (flag, TrainConfig field, argparse keywords); every default is None so that a resumed run knows
# which options were given (and override the checkpoint's) and a fresh run takes TrainConfig's defaults.
OPTIONS = [
    ("--data", "data", dict(nargs="+", metavar="PATH", help="text files or folders; a folder's files are chosen by "
                                                            "content, UTF-8 text (default: the embedded corpus, the "
                                                            "Python standard library's source)")),
    ("--include", "include", dict(nargs="+", metavar="GLOB", help="take only the files of --data folders matching "
                                                                  "one of these, e.g. '*.py' 'docs/*.md' (default: "
                                                                  "every UTF-8 text file that is not hidden)")),
    ("--exclude", "exclude", dict(nargs="+", metavar="GLOB", help="drop the files of --data folders matching these")),
    ("--tokenizer", "tokenizer", dict(metavar="FILE", help="a Hugging Face tokenizer.json (default: bytes)")),
    ("--train-tokenizer", "train_tokenizer", dict(type=int, metavar="VOCAB",
                                                  help="train a BPE of VOCAB tokens on the corpus")),
    ("--seq-len", "seq_len", dict(type=int, help="tokens per training sequence (default 1024)")),
    ("--val-fraction", "val_fraction", dict(type=float, help="share of sequences held out for validation (0.01)")),
    ("--seq-idx", "use_seq_idx", dict(action=argparse.BooleanOptionalAction,
                                      help="reset the recurrent state at document boundaries")),
    ("--arch", "arch", dict(choices=ARCHS, help="model family (default mamba2)")),
    ("--d-model", "d_model", dict(type=int, help="model width (512)")),
    ("--n-layer", "n_layer", dict(type=int, help="number of blocks (8)")),
    ("--d-state", "d_state", dict(type=int, help="SSM state size (mixer default)")),
    ("--headdim", "headdim", dict(type=int, help="Mamba-2 head size (64)")),
    ("--expand", "expand", dict(type=int, help="SSM inner width / d_model (2)")),
    ("--ssm-options", "ssm_options", dict(type=json_object, metavar="JSON",
                                          help='further mixer arguments, e.g. \'{"chunk_size": 64}\'')),
    ("--attn-layer-idx", "attn_layer_idx", dict(type=int_list, metavar="I,J", help="hybrid: attention layer indices")),
    ("--attn-heads", "attn_heads", dict(type=int, help="attention heads (d_model / 64)")),
    ("--d-intermediate", "d_intermediate", dict(type=int,
                                                help="MLP width after each mixer (0; transformer 8/3 d_model)")),
    ("--batch-size", "batch_size", dict(type=int, help="global batch: sequences per optimizer step (16)")),
    ("--micro-batch-size", "micro_batch_size", dict(type=int, help="sequences per process and forward "
                                                                  "(default: batch size / processes)")),
    ("--max-tokens", "max_tokens", dict(type=count, help="training tokens, e.g. 200M (default 200M)")),
    ("--lr", "lr", dict(type=float, help="peak learning rate (6e-4)")),
    ("--min-lr-ratio", "min_lr_ratio", dict(type=float, help="cosine floor as a fraction of --lr (0.1)")),
    ("--warmup-fraction", "warmup_fraction", dict(type=float, help="share of steps warming up (0.02)")),
    ("--weight-decay", "weight_decay", dict(type=float, help="AdamW weight decay on matrices (0.1)")),
    ("--grad-clip", "grad_clip", dict(type=float, help="gradient norm clip, 0: none (1.0)")),
    ("--seed", "seed", dict(type=int, help="initialization and data order (0)")),
    ("--device", "device", dict(help="cuda, cuda:1 or cpu (default: cuda when available)")),
    ("--bf16", "bf16", dict(action=argparse.BooleanOptionalAction, help="bf16 autocast on CUDA (on)")),
    ("--fsdp", "fsdp", dict(action=argparse.BooleanOptionalAction, help="shard the model over processes (FSDP2)")),
    ("--compile", "compile", dict(action=argparse.BooleanOptionalAction,
                                  help="torch.compile the model for the train step (off; not with --fsdp)")),
    ("--cuda-graph", "cuda_graph", dict(action=argparse.BooleanOptionalAction,
                                        help="replay each train step from CUDA graphs, no Python launches per "
                                             "step (off; one process on CUDA, not with --compile)")),
    ("--log-interval", "log_interval", dict(type=int, help="steps between metrics lines (10)")),
    ("--eval-interval", "eval_interval", dict(type=int, help="steps between validations (500)")),
    ("--eval-sequences", "eval_sequences", dict(type=int, help="validation sequences per evaluation (256)")),
    ("--save-interval", "save_interval", dict(type=int, help="steps between checkpoints (1000)")),
    ("--keep-last", "keep_last", dict(type=int, help="newest checkpoints kept, 0: all (3)")),
    ("--max-time", "max_time", dict(type=float, metavar="SECONDS",
                                    help="stop and save after this long (this invocation; --resume does not inherit it)")),
    ("--nonfinite-patience", "nonfinite_patience", dict(type=int, metavar="STEPS",
                                                        help="stop, without saving, once the loss has been NaN or "
                                                             "infinite this many steps in a row, read at log "
                                                             "lines (1)")),
]


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig options, shared with `mambakit demo`."""
    for flag, field, kwargs in OPTIONS:
        parser.add_argument(flag, dest=field, default=None, **kwargs)


def given_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields set on the command line."""
    return {field: getattr(args, field) for _, field, _ in OPTIONS if getattr(args, field) is not None}


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="pre-train a language model", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="new run folder (checkpoints, metrics.jsonl, loss.png)")
    where.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_train_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mambakit.training import Trainer

    options = given_options(args)
    if args.resume:
        trainer = Trainer.resume(args.resume, quiet=args.quiet, **options)
    else:
        trainer = Trainer(TrainConfig(**options), args.out, quiet=args.quiet)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        summary = f"step {result.get('step', trainer.step)}"
        if "val_bpb" in result:
            summary += f", validation loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits per byte"
        print(f"{summary}; checkpoint {result['checkpoint']} ({result['stopped']})")
    # Ctrl-C saved a checkpoint but is still an interruption (130); SIGTERM is a scheduler's request to stop (0).
    return 130 if result["stopped"] == "SIGINT" else 0
