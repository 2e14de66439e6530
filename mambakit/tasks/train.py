"""Train a model on a synthetic task with fresh samples each step, and measure accuracy by length.

    task = InductionHeads()
    model = task_model("mamba", task.vocab_size, d_model=64, n_layer=2)
    train_task(model, task, seq_len=256, steps=2000)
    accuracy(model, task, seq_len=1 << 20, num_samples=8, chunk_len=1 << 16)
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mambakit.tasks.synthetic import IGNORE
from mambakit.training.optim import CosineSchedule


def task_model(arch: str, vocab_size: int, d_model: int = 64, n_layer: int = 2, device=None, **config):
    """A `MambaLMHeadModel` of `arch` ("mamba", "mamba2", "hybrid", "transformer") sized for a task;
    `config` sets other `TrainConfig` model fields (d_state, headdim, attn_heads, ...)."""
    from mambakit import MambaLMHeadModel
    from mambakit.training import TrainConfig

    model_config = TrainConfig(arch=arch, d_model=d_model, n_layer=n_layer, **config).model_config(vocab_size)
    model_config.pad_vocab_size_multiple = 1
    return MambaLMHeadModel(model_config, device=device)


def _scored_logits(model, inputs: torch.Tensor, targets: torch.Tensor,
                   chunk_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the scored positions (n, vocab), their targets (n,)); only the tail the targets need
    goes through the LM head, so million-token inputs do not materialize million-row logits. Inputs
    longer than `chunk_len` run through the model's inference cache that many tokens at a time."""
    scored = targets != IGNORE
    first = int(scored.any(dim=0).nonzero()[0])
    if chunk_len is None or inputs.shape[1] <= chunk_len:
        logits = model(inputs, num_last_tokens=inputs.shape[1] - first).logits
    else:
        logits = _tail_logits_in_chunks(model, inputs, first, chunk_len)
    return logits[scored[:, first:]], targets[:, first:][scored[:, first:]]


def _tail_logits_in_chunks(model, inputs: torch.Tensor, first: int, chunk_len: int) -> torch.Tensor:
    """The logits (batch, L - first, vocab) at positions first.. of inputs (batch, L), computed by feeding
    `chunk_len` tokens at a time through an inference cache (chunked prefill): activations stay bounded
    by the chunk, and each chunk continues from the states the previous ones left."""
    from mambakit.generation import InferenceCache

    batch, length = inputs.shape
    cache = InferenceCache.allocate(model, batch, length)
    tails = []
    for start in range(0, length, chunk_len):
        end = min(start + chunk_len, length)
        cache.seqlen_offset = start
        cache.lengths_per_sample.fill_(start)
        keep = end - max(start, first)
        logits = model(inputs[:, start:end], inference_params=cache, num_last_tokens=max(keep, 1)).logits
        if keep > 0:
            tails.append(logits)
    return torch.cat(tails, dim=1)


def train_task(model, task, seq_len: int, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
               max_time: float | None = None, bf16: bool = False, progress: bool = True,
               on_log: Callable[[dict], None] | None = None, log_interval: int = 100, warmup_steps: int = 0,
               min_lr_ratio: float = 1.0, grad_clip: float | None = None,
               curriculum: Sequence[tuple[int, ...]] = ()) -> list[dict]:
    """Adam on `steps` fresh batches of (batch_size, seq_len), the loss on the scored positions only.

    The defaults are the papers' synthetic-task recipe, a constant `lr`; `min_lr_ratio` < 1 decays it by a
    cosine over `steps` to lr * min_lr_ratio (after `warmup_steps` of linear warmup), and `grad_clip`
    bounds the gradient norm. `curriculum`: (length, steps) or (length, steps, batch) stages trained
    first, in order (batch: `batch_size` unless given), before `seq_len` takes the remaining steps: a
    length curriculum, since what a selective model learns on short sequences carries over to long ones
    at a fraction of their cost. Stops early after `max_time` seconds. Returns the logged records, each
    with the length and batch it trained at."""
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip: expected a positive number or None, got {grad_clip!r}")
    shapes = _stage_shapes(curriculum, seq_len, batch_size, steps)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = CosineSchedule(lr, steps, warmup_steps, min_lr_ratio)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    records, start = [], time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=f"train {task.name}", disable=not progress, dynamic_ncols=True)
    for step, (batch, length) in zip(bar, shapes):
        inputs, targets = (t.to(device) for t in task.sample(batch, length, generator))
        with autocast:
            logits, answers = _scored_logits(model, inputs, targets)
        loss = F.cross_entropy(logits.float(), answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        lr_now = schedule.apply(optimizer, step)
        optimizer.step()
        elapsed = time.perf_counter() - start
        done = step + 1 == steps or (max_time is not None and elapsed > max_time)
        if (step + 1) % log_interval == 0 or done:
            hits = (logits.argmax(-1) == answers).float().mean()
            record = {"step": step + 1, "seq_len": length, "batch_size": batch, "loss": loss.item(),
                      "train_acc": hits.item(), "lr": lr_now, "elapsed_s": elapsed}
            records.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.3f}")
            if on_log is not None:
                on_log(record)
        if done:
            break
    bar.close()
    return records


def _stage_shapes(curriculum: Sequence[tuple[int, ...]], seq_len: int, batch_size: int,
                  steps: int) -> Iterator[tuple[int, int]]:
    """(batch, length) of each of `steps` steps: each curriculum stage's for its steps, then (batch_size,
    seq_len) for the rest. Refuses stages that are not (length, steps[, batch]) of ints >= 1, or that
    leave no step to seq_len."""
    def positive_int(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    for stage in curriculum:
        if not isinstance(stage, (tuple, list)) or len(stage) not in (2, 3) or not all(map(positive_int, stage)):
            raise ValueError(f"curriculum: expected (length, steps[, batch]) stages of ints >= 1, got {stage!r}")
    left = steps - sum(stage[1] for stage in curriculum)
    if left < 1:
        raise ValueError(f"curriculum: its stages take {steps - left} steps, leaving none of the {steps} "
                         f"to the training length {seq_len}")
    stages = [(*stage[:2], stage[2] if len(stage) == 3 else batch_size) for stage in curriculum]
    stages.append((seq_len, left, batch_size))
    return itertools.chain.from_iterable(itertools.repeat((batch, length), n) for length, n, batch in stages)


@torch.no_grad()
def accuracy(model, task, seq_len: int, num_samples: int = 256, batch_size: int = 64, seed: int = 1,
             bf16: bool = False, chunk_len: int | None = None) -> float:
    """Fraction of scored positions predicted right (argmax) on `num_samples` fresh sequences of `seq_len`
    (a seed other than training's). Batches shrink with length so that one forward holds about 2^20 tokens.
    `chunk_len`: sequences longer than this run through the inference cache in chunks of it (None: whole),
    so a forward holds batch x chunk_len tokens and long sequences are evaluated several at a time."""
    if chunk_len is not None and (isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1):
        raise ValueError(f"chunk_len: expected a positive int or None, got {chunk_len!r}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    batch_size = max(1, min(batch_size, (1 << 20) // min(seq_len, chunk_len or seq_len)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    model.eval()
    right = total = 0
    for first in range(0, num_samples, batch_size):
        inputs, targets = (t.to(device) for t in task.sample(min(batch_size, num_samples - first), seq_len, generator))
        with autocast:
            logits, answers = _scored_logits(model, inputs, targets, chunk_len)
        right += int((logits.argmax(-1) == answers).sum())
        total += answers.numel()
    model.train()
    return right / total
