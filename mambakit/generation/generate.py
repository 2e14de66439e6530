"""Autoregressive generation: parallel prefill of the prompts (long ones in pieces, each continuing from
the cached states), then one-token decode steps for all rows.

Prompts of different lengths are exact: rows of equal length are prefilled together in a sub-cache
whose final states are copied into their rows of the main cache, so no pad token ever enters a state;
then every row decodes together (attention layers use `lengths_per_sample` for their ragged rows).
A row that has stopped keeps its output fixed while the others go on.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Iterator, Sequence

import torch
from torch import nn

from mambakit.generation.cache import InferenceCache
from mambakit.generation.sampling import SamplingConfig, row_seeds, sample
from mambakit.ops._common import check_shape

# Prompts longer than this are prefilled in pieces: activations stay bounded by the piece.
DEFAULT_PREFILL_CHUNK = 8192


@dataclass
class GenerationOutput:
    """sequences: (batch, prompt_len + steps) int64 for a tensor input, padded with `pad_token_id` after a
    row stops; a list of token-id lists (prompt + new tokens) for a list input.
    num_new_tokens: (batch,) tokens generated per row, the stop token included.
    scores: (batch, steps, vocab) fp32 logits at each generated position, when asked for."""

    sequences: torch.Tensor | list[list[int]]
    num_new_tokens: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass
class Step:
    """One generated position for every row: tokens (batch,) (`pad_token_id` where the row had stopped),
    logits (batch, vocab), active (batch,) bool: the row produced this token; finished: it stops after it."""

    tokens: torch.Tensor
    logits: torch.Tensor
    active: torch.Tensor
    finished: torch.Tensor


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_length: int | None = None,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    pad_token_id: int | None = None,
    output_scores: bool = False,
    return_dict_in_generate: bool = False,
    cache_dtype: torch.dtype | None = None,
    attention_mask: torch.Tensor | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> torch.Tensor | list[list[int]] | GenerationOutput:
    """Continue each prompt of `input_ids`: (batch, L) int tensor, or a list of token-id lists of any lengths.

    Give `max_new_tokens`, or `max_length` (prompt + new tokens, the official spelling). Sampling options:
    see `SamplingConfig` (greedy when none is given). `seed`: an int (row b uses seed + b) or one per row;
    a row's output depends only on its prompt and seed, never on the rest of the batch. A row stops at
    `eos_token_id` (default: the tokenizer's), any of `stop_token_ids`, or once its generated text holds one
    of `stop_strings` (needs `tokenizer`); the stop token is kept, later positions hold `pad_token_id`
    (default: the first stop id, else 0). `cache_dtype`: of the conv / KV states (default: the model's;
    SSM states are always fp32). Returns the sequences (prompt + new tokens, see `GenerationOutput`), or
    a `GenerationOutput` with `return_dict_in_generate=True` (`output_scores=True` adds the logits).
    A padded tensor batch takes `attention_mask` (batch, L) (0: padding); padding never enters a state,
    and the output keeps the input's layout. `prefill_chunk`: prompts longer than this many tokens are
    prefilled that many at a time, each piece continuing from the states the previous left (None: whole).
    """
    device = next(model.parameters()).device
    prompts = prompt_rows(input_ids, device, attention_mask)
    steps = iterate_tokens(
        model, prompts, max_length=max_length, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        eos_token_id=eos_token_id, stop_token_ids=stop_token_ids, stop_strings=stop_strings,
        tokenizer=tokenizer, pad_token_id=pad_token_id, cache_dtype=cache_dtype, prefill_chunk=prefill_chunk,
    )
    tokens, scores = [], []
    num_new = torch.zeros(len(prompts), dtype=torch.long, device=device)
    for step in steps:
        tokens.append(step.tokens)
        num_new += step.active
        if output_scores:
            scores.append(step.logits.float())
    new = torch.stack(tokens, dim=1) if tokens else torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    if isinstance(input_ids, torch.Tensor):
        sequences = torch.cat([input_ids.to(torch.long), new], dim=1)
    else:
        sequences = [p.tolist() + new[b, : num_new[b]].tolist() for b, p in enumerate(prompts)]
    if not return_dict_in_generate:
        return sequences
    return GenerationOutput(sequences, num_new, torch.stack(scores, dim=1) if output_scores and scores else None)


@torch.no_grad()
def iterate_tokens(
    model: nn.Module,
    prompts: list[torch.Tensor],
    *,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    pad_token_id: int | None = None,
    cache_dtype: torch.dtype | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> Iterator[Step]:
    """Yield one `Step` per generated position until every row has stopped (arguments: see `generate`)."""
    config = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    device = prompts[0].device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    budgets = token_budgets(lengths, max_length, max_new_tokens)
    steps_total = int(budgets.max())
    if steps_total == 0:
        return
    stop_ids = stop_id_tensor(eos_token_id, stop_token_ids, tokenizer, device)
    stop_strings = check_stop_strings(stop_strings, tokenizer)
    pad = pad_token_id if pad_token_id is not None else int(stop_ids[0]) if stop_ids.numel() else 0
    seeds = row_seeds(seed, batch, device)
    vocab = vocab_size(model)
    check_token_ids(prompts, vocab)

    cache = InferenceCache.allocate(model, batch, int(lengths.max()) + steps_total, dtype=cache_dtype)
    logits = prefill(model, cache, prompts, cache_dtype, prefill_chunk)[:, :vocab]
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, p] = True
    finished = budgets == 0
    texts = [[] for _ in prompts] if stop_strings else None
    step = torch.zeros((), dtype=torch.long, device=device)
    for t in range(steps_total):
        tokens = sample(logits, config, seeds, step, seen).masked_fill_(finished, pad)
        active = ~finished
        finished = finished | torch.isin(tokens, stop_ids) | (budgets <= t + 1)
        if texts is not None:
            finished |= stop_string_hits(tokens, active, texts, stop_strings, tokenizer)
        done, broken = torch.stack([finished.all(), logits.isnan().any()]).tolist()  # one host sync per step
        if broken:
            raise FloatingPointError(f"logits: the model produced NaN at generated position {t}")
        yield Step(tokens, logits, active, finished)
        if done:
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        step += 1
        logits = decode_step(model, cache, tokens)[:, :vocab]


def prefill(model: nn.Module, cache: InferenceCache, prompts: list[torch.Tensor],
            cache_dtype: torch.dtype | None = None, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Run the parallel forward over every prompt, leave the final states in `cache` (one row per prompt)
    and return the last position's logits (batch, vocab). Prompts of equal length share one forward,
    in pieces of `prefill_chunk` tokens (None: whole)."""
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, Integral)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk: expected a positive int or None, got {prefill_chunk!r}")
    groups: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(row)
    last_logits = [None] * len(prompts)
    for length, rows in groups.items():
        ids = torch.stack([prompts[r] for r in rows])
        target = cache if len(rows) == len(prompts) else InferenceCache.allocate(
            model, len(rows), cache.max_seqlen, dtype=cache_dtype)
        logits = prefill_rows(model, target, ids, prefill_chunk or length)
        if target is not cache:
            cache.write_rows(rows, target)
        for r, row_logits in zip(rows, logits):
            last_logits[r] = row_logits
    cache.lengths_per_sample.copy_(torch.tensor([len(p) for p in prompts], device=cache.lengths_per_sample.device))
    cache.seqlen_offset = max(groups)
    return torch.stack(last_logits)


def prefill_rows(model: nn.Module, cache: InferenceCache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ids (batch, L) into an empty `cache`, `chunk` tokens at a time, each piece continuing from the
    states the previous left (chunked prefill); return the last position's logits (batch, vocab)."""
    for start in range(0, ids.shape[1], chunk):
        cache.seqlen_offset = start
        cache.lengths_per_sample.fill_(start)
        logits = model(ids[:, start:start + chunk], inference_params=cache, num_last_tokens=1).logits[:, -1]
    return logits


def decode_step(model: nn.Module, cache: InferenceCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (batch,), advance the cache in place and return the next logits (batch, vocab).
    No tensor is created here beyond the model's own activations (the path a CUDA graph will capture)."""
    logits = model(tokens[:, None], inference_params=cache, num_last_tokens=1).logits[:, -1]
    cache.seqlen_offset += 1
    cache.lengths_per_sample += 1
    return logits


def prompt_rows(input_ids, device: torch.device, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The prompts as a list of 1-D int64 tensors on `device`, from a (batch, L) tensor or a list of id lists.
    attention_mask: (batch, L), 0 at padding positions of a tensor input (they are dropped, never run)."""
    if attention_mask is not None and not isinstance(input_ids, torch.Tensor):
        raise ValueError("attention_mask: only for a (batch, seqlen) tensor input_ids; give ragged prompts as lists")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a (batch, seqlen) tensor, got shape {tuple(input_ids.shape)} "
                             "(use input_ids[None] for one prompt)")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids: expected an int32 or int64 tensor, got {input_ids.dtype}")
        if input_ids.device != device:
            raise ValueError(f"input_ids: expected a tensor on the model's device {device}, got {input_ids.device}")
        rows = list(input_ids.to(torch.long))
        if attention_mask is not None:
            check_shape("attention_mask", attention_mask, *input_ids.shape)
            rows = [row[keep.to(device).bool()] for row, keep in zip(rows, attention_mask, strict=True)]
    elif isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence) or not all(
            isinstance(p, (Sequence, torch.Tensor)) and not isinstance(p, str) for p in input_ids):
        raise TypeError("input_ids: expected a (batch, seqlen) int tensor or a list of token-id lists, "
                        f"got {type(input_ids).__name__} (encode text with a tokenizer first)")
    else:
        rows = [torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1) for p in input_ids]
    if not rows:
        raise ValueError("input_ids: expected at least one prompt, got none")
    empty = [b for b, p in enumerate(rows) if p.numel() == 0]
    if empty:
        raise ValueError(f"input_ids: every prompt needs at least one token, rows {empty} are empty")
    return rows


def token_budgets(lengths: torch.Tensor, max_length: int | None, max_new_tokens: int | None) -> torch.Tensor:
    """New tokens allowed per row (batch,) from `max_new_tokens` or `max_length` (prompt included)."""
    if (max_length is None) == (max_new_tokens is None):
        raise ValueError("give exactly one of max_new_tokens and max_length, got "
                         f"max_new_tokens={max_new_tokens!r}, max_length={max_length!r}")
    name, value = ("max_new_tokens", max_new_tokens) if max_new_tokens is not None else ("max_length", max_length)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    if max_new_tokens is not None:
        return torch.full_like(lengths, max_new_tokens)
    if int(lengths.max()) > max_length:
        raise ValueError(f"max_length: expected >= the longest prompt ({int(lengths.max())} tokens), got {max_length}")
    return max_length - lengths


def stop_id_tensor(eos_token_id, stop_token_ids, tokenizer, device) -> torch.Tensor:
    """All token ids that end a row (1-D int64): eos (the tokenizer's when not given) and `stop_token_ids`."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, Integral) else list(eos_token_id)
    ids = eos + list(stop_token_ids)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, Integral) or i < 0]
    if bad:
        raise ValueError(f"eos_token_id / stop_token_ids: expected ints >= 0, got {bad}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def check_stop_strings(stop_strings, tokenizer) -> list[str]:
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings)
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings: expected non-empty strings, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings: needs a tokenizer to read the generated text, got tokenizer=None")
    return stop_strings


def stop_string_hits(tokens, active, texts, stop_strings, tokenizer) -> torch.Tensor:
    """(batch,) bool: rows whose generated text now holds a stop string. `texts` keeps each row's ids (host)."""
    hits = torch.zeros_like(active)
    for b in torch.nonzero(active).flatten().tolist():
        texts[b].append(int(tokens[b]))
        text = tokenizer.decode(texts[b])
        hits[b] = any(s in text for s in stop_strings)
    return hits


def vocab_size(model: nn.Module) -> int:
    """Tokens the model really has (`config.vocab_size`; the embedding may be padded beyond it)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    return next(m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding))


def check_token_ids(prompts: list[torch.Tensor], vocab: int) -> None:
    lo = min(int(p.min()) for p in prompts)
    hi = max(int(p.max()) for p in prompts)
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids: expected token ids in [0, {vocab}), got values in [{lo}, {hi}]")

