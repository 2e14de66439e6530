"""Teacher-forced scoring: the log-probability a model gives each token of a text, and its perplexity."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mambakit.generation.generate import check_token_ids, vocab_size


@dataclass
class TokenScores:
    """token_ids: (L,) the scored sequence; logprobs: (L-1,) fp32, log p(token_i | tokens before i) for i >= 1
    (the first token has no context to be predicted from)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor

    @property
    def total(self) -> float:
        """Sum of the log-probabilities (nats)."""
        return float(self.logprobs.double().sum())

    @property
    def perplexity(self) -> float:
        """exp(-mean log-probability)."""
        return math.exp(-self.total / self.logprobs.numel())


@torch.no_grad()
def log_likelihood(model: nn.Module, text: str | Sequence[int] | torch.Tensor, tokenizer=None) -> TokenScores:
    """Score one sequence, given as text (needs `tokenizer`, default `model.tokenizer`) or token ids (L,), L >= 2.

    One parallel forward over the whole sequence; log-probabilities are taken over the model's real
    vocabulary (`config.vocab_size`), not the padded embedding rows.
    """
    if isinstance(text, str):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("tokenizer: needed to score text, got None and the model has none")
        text = tokenizer.encode(text)
    device = next(model.parameters()).device
    ids = torch.as_tensor(text, dtype=torch.long, device=device) if not isinstance(text, torch.Tensor) else text
    if ids.dim() != 1 or ids.numel() < 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("text: expected a string or at least 2 int token ids (L,), "
                         f"got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"text: expected token ids on the model's device {device}, got {ids.device}")
    ids = ids.long()
    vocab = vocab_size(model)
    check_token_ids([ids], vocab)
    logits = model(ids[None]).logits[0, :-1, :vocab]
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[1:, None]).squeeze(-1)
    return TokenScores(ids, logprobs)
