"""`mambakit convert`: rewrite a checkpoint in the official `state-spaces` or the `transformers` layout.

    mambakit convert path/to/mamba-130m out/mamba-130m-hf --to hf
    mambakit convert path/to/hf-checkpoint out/official --to official --dtype bfloat16

The source may be in either layout (detected from its config.json) and is checked in full before
anything is written; what is written is loaded back and compared with the source, tensor by tensor.
The tokenizer found beside it is written along, its special token ids in the transformers layout's
config.json and generation_config.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from mambakit._io import atomic_path
from mambakit.cli import DTYPES

# Hugging Face files that travel with a tokenizer.json; the tokenizer itself is saved by save_pretrained.
TOKENIZER_FILES = ("special_tokens_map.json", "vocab.json", "merges.txt")


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint between the official and transformers layouts",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory (official or transformers layout) or hub id")
    parser.add_argument("dst", type=Path, help="output directory")
    parser.add_argument("--to", required=True, choices=["official", "hf"], help="layout to write")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the written weights (auto: as stored; parameters kept in fp32 stay fp32)")
    parser.add_argument("--bin", action="store_true", help="write pytorch_model.bin instead of model.safetensors")
    parser.set_defaults(func=run)


def check_loads_back(model, directory: Path) -> None:
    """Raise CheckpointError unless `directory` loads into a model with exactly `model`'s tensors."""
    from mambakit.models import CheckpointError, MambaLMHeadModel

    try:
        back = MambaLMHeadModel.from_pretrained(directory, dtype="auto").state_dict()
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory}: written, but it does not load back: {e}") from e
    differing = [k for k, v in model.state_dict().items() if not torch.equal(back[k], v)]
    if differing:
        raise CheckpointError(f"{directory}: written, but loading it back gives other tensors: {differing[:5]}")


def run(args: argparse.Namespace) -> int:
    from mambakit.models import MambaLMHeadModel

    try:
        model = MambaLMHeadModel.from_pretrained(args.src, dtype=DTYPES.get(args.dtype, "auto"))
        model.save_pretrained(args.dst, format=args.to, safe_serialization=not args.bin)
        check_loads_back(model, args.dst)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # CheckpointError is a ValueError
        print(f"mambakit convert: error: {e}", file=sys.stderr)
        return 2
    src = Path(args.src)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    written = ["tokenizer"] if model.tokenizer is not None else []
    for name in copied:
        with atomic_path(args.dst / name) as tmp:
            shutil.copyfile(src / name, tmp)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({args.to} layout, {n_params:,} parameters, "
          f"{str(model.backbone.embedding.weight.dtype).removeprefix('torch.')}"
          + (f", with {', '.join(written + copied)}" if written + copied else "") + ")", file=sys.stderr)
    return 0
