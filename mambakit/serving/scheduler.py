"""Continuous batching: one thread owns the model and a decode batch of at most `max_batch` rows.

Every iteration, rows that finished or were cancelled leave (the last row moves into the hole, so the
live rows are always cache rows 0..n-1 and a step costs n rows), waiting jobs are prefilled (a bounded
number of prompt tokens per iteration, so running streams keep moving) and join, and one decode step
advances every row. An SSM row's state has a fixed size, so joining and leaving is a copy of a few
tensors, with no paged memory.

The decode is pipelined by one step: an iteration queues step t+1 on the device (its input tokens are
step t's, already there) before it reads step t's tokens back and hands them out, so the host's work
(delivery, stop checks, joins) runs while the device computes. A row that finished at step t therefore
computes one more step, whose token is dropped.

A row samples with its own `SamplingConfig`, seed and step counter as `generation.sampling.sample` does,
so its tokens are exactly those `generate` gives for the same prompt and seed, whatever else is in the batch.
Its uniform draws are computed DRAW_WINDOW steps at a time in one call (a draw is ~60 tiny tensor ops: one
call a step was most of a step's launches on a GPU); a step gathers them.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mambakit.generation import InferenceCache, SamplingConfig, StopStringWatch, decode_step, prefill
from mambakit.generation.decoder import Decoder
from mambakit.generation.generate import vocab_size
from mambakit.generation.options import check_int
from mambakit.generation.sampling import sample_with_draws, uniform
from mambakit.ops._common import STEP_STATE_DTYPES, check_dtype_choice
from mambakit.serving.metrics import Metrics
from mambakit.serving.protocol import RequestError

# Prompt tokens prefilled per iteration at most (one prompt at least): bounds the stall of running streams.
PREFILL_TOKENS_PER_ITERATION = 4096
# Steps of uniform draws a sampled row gets per call of `uniform`.
DRAW_WINDOW = 64


@dataclass
class Job:
    """One choice of one request: its prompt, budget, sampling and where its tokens go.

    deliver(token, finish) is called once per generated token (finish None), then once with token None and
    finish "stop" (stop token or string), "length" (max_tokens) or "error"; where it runs is the scheduler's
    `relay`'s choice (by default on the scheduler thread).
    """

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    seed: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    deliver: Callable[[int | None, str | None], None]
    submitted: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    stop_watch: StopStringWatch | None = field(default=None, repr=False)  # set at the join when stop_strings
    cancelled: bool = False
    finished: bool = False
    sampled: int = 0  # steps sampled for its row so far (a pipelined extra one included)


@dataclass(frozen=True)
class SchedulerOptions:
    """max_batch: rows decoded together; max_queue: jobs waiting beyond them (more: 429);
    max_seqlen: prompt + new tokens of one row (sizes attention KV caches); prefill_chunk: see `prefill`;
    state_dtype: of the rows' SSM states (see GenerationOptions.state_dtype); threads: torch's CPU threads on
    the scheduler's thread, which runs the model (None: torch's setting as it is)."""

    max_batch: int = 64
    max_queue: int = 256
    max_seqlen: int = 4096
    prefill_chunk: int = 2048
    cg: bool | None = None  # decode in buckets of batch sizes, CUDA graphs on CUDA (None: on when on CUDA)
    state_dtype: torch.dtype = torch.float32
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_seqlen", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.cg not in (None, True, False):
            raise ValueError(f"cg: expected True, False or None, got {self.cg!r}")
        check_int("threads", self.threads, 1, allow_none=True)
        check_dtype_choice("state_dtype", self.state_dtype, STEP_STATE_DTYPES)


# A job's delivery: (job, token, None) for a generated token, (job, None, finish) at its end.
Delivery = tuple[Job, int | None, str | None]


@dataclass
class Pending:
    """A decode step queued on the device: the jobs of its rows (in row order) and their tokens (-1: NaN
    logits) on their way into a host buffer; `event` (CUDA) marks the copy done."""

    jobs: list[Job]
    tokens: torch.Tensor
    event: torch.cuda.Event | None


def deliver_here(deliveries: list[Delivery]) -> None:
    """The default relay: each job's `deliver` runs on the scheduler thread."""
    for job, token, finish in deliveries:
        job.deliver(token, finish)


class Scheduler:
    """Owns `model` on its own thread (`start()` / `stop()`); `submit` and `cancel` are thread-safe.

    `relay(deliveries)` is called on the scheduler thread with each iteration's deliveries in order, at most
    twice per iteration (after the joins' first tokens, after the decode step), and must see that every
    job's `deliver` gets called: the server hands the whole list to its event loop in one wakeup.
    """

    def __init__(self, model: nn.Module, options: SchedulerOptions, tokenizer, metrics: Metrics,
                 relay: Callable[[list[Delivery]], None] = deliver_here):
        self.model, self.options, self.tokenizer, self.metrics = model, options, tokenizer, metrics
        self.relay = relay
        self._outbox: list[Delivery] = []  # this iteration's deliveries, relayed together
        self.vocab = vocab_size(model)
        self.cache = InferenceCache.allocate(model, options.max_batch, options.max_seqlen,
                                             ssm_dtype=options.state_dtype)
        device = self.cache.lengths_per_sample.device
        rows = options.max_batch
        # Per cache row: the token to feed next, steps sampled (its job's `sampled`, on the device), the uniform
        # draws of the DRAW_WINDOW steps around its next one (column steps % DRAW_WINDOW; sampled rows), tokens
        # seen (rows with a repetition penalty).
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.steps = torch.zeros(rows, dtype=torch.long, device=device)
        self.draws = torch.zeros(rows, DRAW_WINDOW, dtype=torch.float64, device=device)
        self.seen = torch.zeros(rows, self.vocab, dtype=torch.bool, device=device)
        self.rows: list[Job] = []  # rows[i] occupies cache row i
        # Host slots for sampled tokens (pinned on CUDA, so the copy is asynchronous), used in turn: while a
        # queued step waits for delivery, a join's tokens and the next step's take the two others.
        self._host_tokens = torch.zeros(3, rows, dtype=torch.long, pin_memory=device.type == "cuda")
        self._slot = 0
        self._pending: Pending | None = None
        # With cg, a decoder per bucket of batch sizes (powers of two and max_batch), each over the first rows
        # of the one cache, its step captured as a CUDA graph on CUDA (eager elsewhere); n live rows run the
        # smallest bucket >= n (the rows past n are free, their outputs ignored). Captured now, while the
        # cache holds no live row (a capture zeroes it).
        buckets = options.cg if options.cg is not None else device.type == "cuda"
        self.buckets = sorted({min(1 << i, rows) for i in range(rows.bit_length() + 1)}) if buckets else []
        with torch.no_grad():
            self.decoders = {b: Decoder(model, b, options.max_seqlen, 1, self.vocab, 1, None, None, None,
                                        graph=device.type == "cuda", cache=self._first_rows(b)) for b in self.buckets}
        self.waiting: deque[Job] = deque()
        self.accepting = True
        self._stopping = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mambakit-scheduler", daemon=True)

    # --- the HTTP side --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def random_seed(self) -> int:
        return random.randrange(2**62)

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request, all or none: 503 while shutting down, 429 when the queue is full."""
        with self._wake:
            if not self.accepting:
                raise RequestError("the server is shutting down (or its model failed)", status=503,
                                   type="server_error", code="unavailable")
            if len(jobs) > self.options.max_queue:  # could never be queued: retrying would not help
                raise RequestError(f"n: {len(jobs)} choices (prompts x n) is more than the queue holds "
                                   f"({self.options.max_queue}, --max-queue)", "n")
            if len(self.waiting) + len(jobs) > self.options.max_queue:
                raise RequestError(f"the queue is full ({self.options.max_queue} waiting, --max-queue); "
                                   "retry later", status=429, type="rate_limit_error", code="queue_full")
            self.waiting.extend(jobs)
            self.metrics.set_queue_depth(len(self.waiting))
            self._wake.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: the jobs leave the queue now, the batch at the next iteration."""
        with self._wake:
            for job in jobs:
                job.cancelled = True
            self.waiting = deque(job for job in self.waiting if not job.cancelled)
            self.metrics.set_queue_depth(len(self.waiting))
            self._wake.notify()

    def stop(self) -> None:
        """Refuse new jobs, end the loop after its iteration; jobs still there end with "error"."""
        with self._wake:
            self.accepting = False
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    # --- the model side (scheduler thread only) -------------------------------------------------

    def _run(self) -> None:
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        try:
            with torch.no_grad():
                while self._iterate():
                    pass
        except Exception as e:  # a model failure ends every job with an error instead of hanging them
            self.metrics.record_error(f"{type(e).__name__}: {e}")
            traceback.print_exc()
        with self._wake:
            self.accepting = False  # /health now answers 503; new requests too
        for job in [*self.rows, *self.waiting]:
            if not job.finished:
                self._outbox.append((job, None, "error"))
        self._relay()
        self.rows, self.waiting = [], deque()

    def _iterate(self) -> bool:
        with self._wake:
            while not self.rows and not self.waiting and self._pending is None and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return False
            joining = self._take_waiting()
        self._leave()
        if joining:
            try:
                self._join(joining)
            except RuntimeError as e:  # e.g. out of memory on a long prompt: those jobs fail, the batch goes on
                self.metrics.record_error(f"prefill: {type(e).__name__}: {e}")
                for job in joining:
                    if not job.finished:
                        job.finished = True  # a row it may hold leaves with _leave
                        self._outbox.append((job, None, "error"))
            self._relay()  # the first tokens go out before the decode step
            self._leave()
        queued = self._queue_step() if self.rows else None
        if self._pending is not None:
            self._deliver(self._pending)
            self._relay()
        self._pending = queued
        return True

    def _relay(self) -> None:
        if self._outbox:
            deliveries, self._outbox = self._outbox, []
            self.relay(deliveries)

    def _decode(self, n: int) -> torch.Tensor:
        """One decode step of rows 0..n-1: their next logits (n, vocab)."""
        if not self.buckets:
            return decode_step(self.model, self._first_rows(n), self.tokens[:n])[:, : self.vocab]
        decoder = self.decoders[next(b for b in self.buckets if b >= n)]
        decoder.buffers.tokens.copy_(self.tokens[: decoder.buffers.tokens.shape[0]])
        return decoder.advance()[:n]

    def _first_rows(self, n: int) -> InferenceCache:
        """The cache's first n rows, sharing its storage (the layers read the first rows of larger states)."""
        return dataclasses.replace(self.cache, max_batch_size=n, seqlen_offset=1,
                                   lengths_per_sample=self.cache.lengths_per_sample[:n])

    def _take_waiting(self) -> list[Job]:
        """Jobs to prefill now (lock held): as many as free rows and the prefill budget allow."""
        joining, tokens = [], 0
        while self.waiting and len(self.rows) + len(joining) < self.options.max_batch:
            job = self.waiting[0]
            if joining and tokens + len(job.prompt) > PREFILL_TOKENS_PER_ITERATION:
                break
            joining.append(self.waiting.popleft())
            tokens += len(job.prompt)
        self.metrics.set_queue_depth(len(self.waiting))
        return joining

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` into the rows after the live ones and choose their first tokens."""
        start = len(self.rows)
        rows = list(range(start, start + len(jobs)))
        # Every prompt in one host-to-device copy (one copy per prompt cost a launch and a staging copy each).
        flat = self._upload([token for job in jobs for token in job.prompt])
        prompts = list(flat.split([len(job.prompt) for job in jobs]))
        part = self.cache.zeros_like(len(jobs))
        logits = prefill(self.model, part, prompts, prefill_chunk=self.options.prefill_chunk)[:, : self.vocab]
        self.cache.write_rows(rows, part)
        self.steps[start:start + len(jobs)] = 0
        for row, prompt, job in zip(rows, prompts, jobs):
            if job.sampling.repetition_penalty != 1.0:
                self.seen[row] = False
                self.seen[row, prompt] = True
        for job in jobs:
            job.stop_watch = StopStringWatch(self.tokenizer, job.stop_strings) if job.stop_strings else None
        self.rows.extend(jobs)
        self.metrics.set_occupancy(len(self.rows))
        self.metrics.add_prompt_tokens(sum(len(job.prompt) for job in jobs))
        self._deliver(self._read_back(jobs, self._sample(logits, start)))

    def _queue_step(self) -> Pending:
        """Queue one decode step of the live rows and the copy of its tokens to the host; no sync."""
        return self._read_back(list(self.rows), self._sample(self._decode(len(self.rows)), 0))

    def _read_back(self, jobs: list[Job], chosen: torch.Tensor) -> Pending:
        self._slot = (self._slot + 1) % len(self._host_tokens)
        host = self._host_tokens[self._slot, : len(jobs)]
        host.copy_(chosen, non_blocking=True)
        event = None
        if chosen.is_cuda:
            event = torch.cuda.Event()
            event.record()
        return Pending(jobs, host, event)

    def _sample(self, logits: torch.Tensor, start: int) -> torch.Tensor:
        """Sample the next token of rows start..start+len(logits)-1, each group of rows sharing a
        SamplingConfig in one call, on the device: the tokens, -1 where the logits hold a NaN."""
        end = start + logits.shape[0]
        groups: dict[SamplingConfig, list[int]] = {}
        drawn_out = []  # (row, step) of sampled rows whose draws are used up (or not drawn yet: a new row)
        for row in range(start, end):
            job = self.rows[row]
            groups.setdefault(job.sampling, []).append(row)
            if not job.sampling.greedy and job.sampled % DRAW_WINDOW == 0:
                drawn_out.append((row, job.sampled))
            job.sampled += 1
        if drawn_out:
            self._draw(drawn_out)
        draws = None
        if not all(config.greedy for config in groups):
            column = self.steps[start:end].remainder(DRAW_WINDOW)[:, None]
            draws = self.draws[start:end].gather(1, column).squeeze(1)
        for config, rows in groups.items():
            if len(rows) == end - start:  # one group (the usual case): slices, no index tensor to upload
                index, part, part_draws = slice(start, end), logits, draws
            else:
                index = self._upload(rows)
                part, part_draws = logits[index - start], None if draws is None else draws[index - start]
            penalty = config.repetition_penalty != 1.0
            self.tokens[index] = sample_with_draws(part, config, part_draws, self.seen[index] if penalty else None)
            if penalty:
                self.seen[index] = self.seen[index].scatter(1, self.tokens[index, None], True)
        self.steps[start:end] += 1
        return torch.where(logits.isnan().any(dim=-1), -1, self.tokens[start:end])

    def _draw(self, rows: list[tuple[int, int]]) -> None:
        """The uniform draws of DRAW_WINDOW steps of each (row, first step), in one call."""
        index, seeds, first = self._upload([[row, self.rows[row].seed, step] for row, step in rows]).unbind(1)
        window = torch.arange(DRAW_WINDOW, device=self.draws.device)
        self.draws[index] = uniform(seeds[:, None], first[:, None] + window)

    def _upload(self, values: list) -> torch.Tensor:
        """Host ints as an int64 tensor on the scheduler's device, without waiting for the device: a plain copy
        to a GPU synchronizes its stream; a non-blocking one from pinned memory does not."""
        host = torch.tensor(values, dtype=torch.long)
        if not self.tokens.is_cuda:
            return host
        return host.pin_memory().to(self.tokens.device, non_blocking=True)

    def _deliver(self, step: Pending) -> None:
        """Wait for a step's tokens and queue them for their jobs; jobs that ended meanwhile get none."""
        if step.event is not None:
            step.event.synchronize()
        chosen = step.tokens.tolist()
        now = time.perf_counter()
        outbox = self._outbox
        for job, token in zip(step.jobs, chosen):
            if job.cancelled or job.finished:  # a cancelled job, or the extra step of one that has ended
                continue
            if token < 0:  # NaN logits: no token is passed off as a result
                job.finished = True
                outbox.append((job, None, "error"))
                continue
            if not job.generated:
                self.metrics.observe_first_token(now - job.submitted)
            job.generated.append(token)
            outbox.append((job, token, None))
            reason = self._finish_reason(job, token)
            if reason is not None:
                job.finished = True
                outbox.append((job, None, reason))
        self.metrics.add_generated_tokens(len(chosen), now)

    def _finish_reason(self, job: Job, token: int) -> str | None:
        if token in job.stop_ids:
            return "stop"
        # generate()'s rule: the generated text holds a stop string (watched incrementally: no O(n) decode a token).
        if job.stop_watch is not None and job.stop_watch.push(token):
            return "stop"
        return "length" if len(job.generated) >= job.max_tokens else None

    def _leave(self) -> None:
        """Drop finished and cancelled rows; the last live row moves into each hole."""
        for row in reversed(range(len(self.rows))):
            if not (self.rows[row].finished or self.rows[row].cancelled):
                continue
            last = len(self.rows) - 1
            if row != last:
                self.cache.write_rows([row], self.cache.select([last]))
                for buffer in (self.tokens, self.steps, self.draws, self.seen):
                    buffer[row] = buffer[last]
                self.rows[row] = self.rows[last]
            self.rows.pop()
        self.metrics.set_occupancy(len(self.rows))
