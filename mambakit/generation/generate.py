"""Autoregressive generation: parallel prefill of the prompts (long ones in pieces, each continuing from
the cached states), then one-token decode steps for all rows.

Prompts of different lengths are exact: rows of equal length are prefilled together in a sub-cache
whose final states are copied into their rows of the main cache, so no pad token ever enters a state;
then every row decodes together (attention layers use `lengths_per_sample` for their ragged rows).
A row that has stopped keeps its output fixed while the others go on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from mambakit.generation.cache import InferenceCache
from mambakit.generation.decoder import get_decoder
from mambakit.generation.options import DEFAULT_PREFILL_CHUNK, GenerationOptions, check_int
from mambakit.generation.sampling import row_seeds
from mambakit.ops._common import check_shape


@dataclass
class GenerationOutput:
    """sequences: (batch, prompt_len + steps) int64 for a tensor input, padded with `pad_token_id` after a
    row stops; a list of token-id lists (prompt + new tokens) for a list input.
    num_new_tokens: (batch,) tokens generated per row, the stop token included.
    scores: with output_scores, one (batch, vocab) fp32 tensor of logits per generated position (the
    official format)."""

    sequences: torch.Tensor | list[list[int]]
    num_new_tokens: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None


@dataclass
class Step:
    """One generated position for every row: tokens (batch,) (`pad_token_id` where the row had stopped),
    logits (batch, vocab) (valid until the next step: copy them to keep them), active (batch,) bool: the row
    produced this token; finished: it stops after it. With `check_every` > 1 the last few steps may have
    no active row."""

    tokens: torch.Tensor
    logits: torch.Tensor
    active: torch.Tensor
    finished: torch.Tensor


# generate() reads the stop condition back every this many tokens (one host sync each time).
GENERATE_CHECK_EVERY = 16


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_length: int | None = None,
    top_k: int | None = 1,
    top_p: float = 0.0,
    min_p: float = 0.0,
    temperature: float = 1.0,
    return_dict_in_generate: bool = False,
    output_scores: bool = False,
    *,
    attention_mask: torch.Tensor | None = None,
    streamer=None,
    enable_timing: bool = False,
    **options,
) -> torch.Tensor | list[list[int]] | GenerationOutput:
    """Continue each prompt of `input_ids`: (batch, L) int tensor, or a list of token-id lists of any lengths.

    The official `mamba_ssm` call: `max_length` counts the prompt (or give `max_new_tokens`), greedy
    unless `top_k != 1`, `cg=True` for CUDA graphs (here the default on CUDA), `teacher_outputs`,
    `vocab_size`, `eos_token_id`, `repetition_penalty`; `streamer` gets `put(prompt ids)`, `put(tokens)`
    per step and `end()` (transformers' streamer protocol); `enable_timing` prints the time taken.
    Further options: see `GenerationOptions` (seed, stop_token_ids, stop_strings, tokenizer, ...). A row's
    output depends only on its prompt and seed, never on the rest of the batch.
    A padded tensor batch takes `attention_mask` (batch, L) (0: padding); padding never enters a state,
    and the output keeps the input's layout. Returns the sequences (prompt + new tokens), or a
    `GenerationOutput` with `return_dict_in_generate=True`.
    """
    device = next(model.parameters()).device
    prompts = prompt_rows(input_ids, device, attention_mask)
    options.setdefault("check_every", 1 if streamer is not None else GENERATE_CHECK_EVERY)
    config = GenerationOptions(max_length=max_length, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature,
                               **options)
    if streamer is not None:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("streamer: needs prompts of one length, got ragged prompts")
        streamer.put(torch.stack(prompts).cpu())
    start = time.perf_counter()
    tokens, active, scores = [], [], []
    for step in decode_steps(model, prompts, config):
        tokens.append(step.tokens)
        active.append(step.active)
        if output_scores:
            scores.append(step.logits.to(torch.float32, copy=True))  # the step's logits buffer is reused
        if streamer is not None:
            streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    if enable_timing:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"Prompt processing + decoding time: {(time.perf_counter() - start) * 1000:.0f}ms")
    batch = len(prompts)
    new = torch.stack(tokens, dim=1) if tokens else torch.empty(batch, 0, dtype=torch.long, device=device)
    num_new = torch.stack(active, dim=1).sum(1) if active else torch.zeros(batch, dtype=torch.long, device=device)
    # Steps may have run past the last row's stop before it was read back (check_every > 1).
    new = new[:, : int(num_new.max())] if tokens else new
    scores = scores[: new.shape[1]]
    if isinstance(input_ids, torch.Tensor):
        sequences = torch.cat([input_ids.to(torch.long), new], dim=1)
    else:
        sequences = [p.tolist() + new[b, : num_new[b]].tolist() for b, p in enumerate(prompts)]
    if not return_dict_in_generate:
        return sequences
    return GenerationOutput(sequences, num_new, tuple(scores) if output_scores else None)


def iterate_tokens(model: nn.Module, prompts: list[torch.Tensor], **options) -> Iterator[Step]:
    """Yield one `Step` per generated position until every row has stopped.

    prompts: 1-D int64 tensors on the model's device (`prompt_rows` makes them); options: `GenerationOptions`."""
    return decode_steps(model, prompts, GenerationOptions(**options))


@torch.no_grad()  # on a generator function: every resumption runs without autograd, not only its creation
def decode_steps(model: nn.Module, prompts: list[torch.Tensor], options: GenerationOptions) -> Iterator[Step]:
    """Prefill the prompts, then decode (with CUDA graphs on CUDA unless options.cg is False); see `iterate_tokens`."""
    device = prompts[0].device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    budgets = options.token_budgets(lengths)
    steps_total = int(budgets.max())
    if steps_total == 0:
        return
    stop_ids = options.stop_ids(device)
    pad = options.pad_token_id if options.pad_token_id is not None else int(stop_ids[0]) if stop_ids.numel() else 0
    seeds = row_seeds(options.seed, batch, device)
    model_vocab = vocab_size(model)
    check_token_ids(prompts, model_vocab)
    vocab = model_vocab if options.vocab_size is None else options.vocab_size
    if vocab > model_vocab:
        raise ValueError(f"vocab_size: expected at most the model's vocab_size {model_vocab}, got {vocab}")
    teacher = options.teacher_outputs
    if teacher is not None:
        check_shape("teacher_outputs", teacher, batch, None)
        teacher = teacher.to(device=device, dtype=torch.long)
    graph = device.type == "cuda" and options.cg is not False
    decoder = get_decoder(model, batch, int(lengths.max()) + steps_total, steps_total, vocab, stop_ids.numel(),
                          options.sampling, options.cache_dtypes, None if teacher is None else teacher.shape[1], graph,
                          compiled=options.compile and not graph)
    buffers = decoder.buffers
    buffers.load(prompts, seeds, budgets.to(device), stop_ids, pad, teacher)
    logits = prefill(model, decoder.cache, prompts, options.prefill_chunk)[:, :vocab]
    buffers.choose(logits, options.sampling)
    texts = [[] for _ in prompts] if options.stop_strings else None
    every = 1 if texts is not None else options.check_every
    for t in range(steps_total):
        if t > 0:
            logits = decoder.advance()
        if texts is not None:
            hits = stop_string_hits(buffers.sequence[:, t], buffers.active[:, t], texts, options.stop_strings,
                                    options.tokenizer)
            buffers.finished |= hits
            buffers.finished_at[:, t] |= hits
        done = False
        if (t + 1) % every == 0 or t + 1 == steps_total:
            done, broken = torch.stack([buffers.finished.all(), buffers.nan]).tolist()  # one host sync
            if broken:
                raise FloatingPointError(f"logits: the model produced NaN at or before generated position {t}")
        yield Step(buffers.sequence[:, t], logits, buffers.active[:, t], buffers.finished_at[:, t])
        if done:
            return


def prefill(model: nn.Module, cache: InferenceCache, prompts: list[torch.Tensor],
            prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Run the parallel forward over every prompt, leave the final states in `cache` (one row per prompt)
    and return the last position's logits (batch, vocab). Prompts of equal length share one forward,
    in pieces of `prefill_chunk` tokens (None: whole)."""
    check_int("prefill_chunk", prefill_chunk, 1, allow_none=True)
    groups: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(row)
    last_logits = [None] * len(prompts)
    for length, rows in groups.items():
        ids = torch.stack([prompts[r] for r in rows])
        target = cache if len(rows) == len(prompts) else cache.zeros_like(len(rows))
        logits = prefill_rows(model, target, ids, prefill_chunk or length)
        if target is not cache:
            cache.write_rows(rows, target)
        for r, row_logits in zip(rows, logits):
            last_logits[r] = row_logits
    cache.lengths_per_sample.copy_(torch.tensor([len(p) for p in prompts]), non_blocking=True)  # no wait on the GPU
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
    lo, hi = torch.stack(torch.aminmax(torch.cat(prompts))).tolist()  # one host sync for every row
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids: expected token ids in [0, {vocab}), got values in [{lo}, {hi}]")

