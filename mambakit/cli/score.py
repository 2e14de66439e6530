"""`mambakit score`: teacher-forced log-likelihood and perplexity of a text under a checkpoint.

    mambakit score --model path/to/ckpt --text-file essay.txt [--per-token] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

from mambakit.cli.generate import add_model_arguments, add_text_arguments, load_model, read_text


def register(subparsers) -> None:
    parser = subparsers.add_parser("score", help="log-likelihood and perplexity of a text", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_text_arguments(parser, "text")
    parser.add_argument("--per-token", action="store_true", help="also list each token with its log-probability")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mambakit.generation import log_likelihood

    try:
        text = read_text(args, "text")
        model, tokenizer = load_model(args)
        scores = log_likelihood(model, text, tokenizer=tokenizer)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input, missing files, unusable --device
        print(f"mambakit score: error: {e}", file=sys.stderr)
        return 2
    ids, logprobs = scores.token_ids.tolist(), scores.logprobs.tolist()
    result = {"tokens": len(ids), "scored_tokens": len(logprobs), "log_likelihood": scores.total,
              "mean_log_prob": scores.total / len(logprobs), "perplexity": scores.perplexity}
    per_token = [{"token": tokenizer.decode([t]), "id": t, "log_prob": lp}
                 for t, lp in zip(ids[1:], logprobs, strict=True)]
    if args.json:
        print(json.dumps({**result, "per_token": per_token} if args.per_token else result))
        return 0
    if args.per_token:
        for row in per_token:
            print(f"{row['log_prob']:10.4f}  {row['id']:>7}  {row['token']!r}")
    print(f"tokens: {result['tokens']} ({result['scored_tokens']} scored)  "
          f"log-likelihood: {result['log_likelihood']:.4f} nats  mean: {result['mean_log_prob']:.4f}  "
          f"perplexity: {result['perplexity']:.4f}")
    return 0
