"""The decode loop's device side: one step feeds the last tokens through the model, samples the next ones
and records them, all as tensor operations on preallocated buffers (no host sync), so that the same step
runs eagerly or replays as one CUDA graph.

A `Decoder` owns an inference cache and the buffers for one batch size; on CUDA its step is captured
once and replayed per token (the host then does nothing per token but a replay). Decoders are kept per
model (a few at a time) and reused by later calls with the same shapes and sampling options.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from mambakit.generation.cache import CacheDtypes, InferenceCache
from mambakit.generation.sampling import SamplingConfig, sample
from mambakit.ops._common import overlapped_launches
from mambakit.ops.rowwise_linear import RowwiseProducts

# Decoders kept per model: each holds a cache (states for its batch) and, on CUDA, a captured graph.
MAX_DECODERS_PER_MODEL = 2
# Stop ids are padded to a multiple of this, so that calls with a few more stop ids reuse a graph.
STOP_ID_SLOTS = 8

_decoders: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def _argmax_keys(batch: int, device: torch.device) -> torch.Tensor | None:
    if device.type != "cuda":
        return None
    from mambakit.generation.triton_greedy import argmax_keys

    return argmax_keys(batch, device)


@dataclass
class DecodeBuffers:
    """Device tensors of one decode loop (batch B, at most S steps, vocab V).

    tokens (B,): the last chosen tokens; finished (B,) bool; step () int64: positions chosen so far;
    sequence, active, finished_at (B, S): per step the token, whether the row produced it, whether it
    stopped there; seeds, budgets, prompt_lengths (B,); stop_ids (K,), -1 padded; pad () int64;
    seen (B, V) bool (repetition penalty) or None; teacher (B, T) or None; nan () bool: NaN logits seen;
    argmax_keys (B, 2) int64: the one-launch greedy choice's scratch on CUDA (`triton_greedy`), else None.
    """

    tokens: torch.Tensor
    finished: torch.Tensor
    step: torch.Tensor
    sequence: torch.Tensor
    active: torch.Tensor
    finished_at: torch.Tensor
    seeds: torch.Tensor
    budgets: torch.Tensor
    prompt_lengths: torch.Tensor
    stop_ids: torch.Tensor
    pad: torch.Tensor
    seen: torch.Tensor | None
    teacher: torch.Tensor | None
    nan: torch.Tensor
    argmax_keys: torch.Tensor | None = None

    @classmethod
    def allocate(cls, batch: int, steps: int, vocab: int, stop_slots: int, device: torch.device,
                 repetition_penalty: bool, teacher_len: int | None) -> "DecodeBuffers":
        def longs(*shape):
            return torch.zeros(shape, dtype=torch.long, device=device)

        def bools(*shape):
            return torch.zeros(shape, dtype=torch.bool, device=device)

        return cls(tokens=longs(batch), finished=bools(batch), step=longs(), sequence=longs(batch, steps),
                   active=bools(batch, steps), finished_at=bools(batch, steps), seeds=longs(batch),
                   budgets=longs(batch), prompt_lengths=longs(batch), stop_ids=longs(stop_slots), pad=longs(),
                   seen=bools(batch, vocab) if repetition_penalty else None,
                   teacher=longs(batch, teacher_len) if teacher_len is not None else None, nan=bools(),
                   argmax_keys=_argmax_keys(batch, device))

    def load(self, prompts: list[torch.Tensor], seeds: torch.Tensor, budgets: torch.Tensor, stop_ids: torch.Tensor,
             pad: int, teacher: torch.Tensor | None) -> None:
        """Fill the buffers in place for a new call (their addresses stay: a captured graph reads them)."""
        self.step.zero_()
        self.nan.zero_()
        self.sequence.zero_()
        self.active.zero_()
        self.finished_at.zero_()
        self.seeds.copy_(seeds)
        self.budgets.copy_(budgets)
        self.finished.copy_(budgets == 0)
        self.prompt_lengths.copy_(torch.tensor([len(p) for p in prompts]), non_blocking=True)
        self.stop_ids.fill_(-1)
        self.stop_ids[: stop_ids.numel()] = stop_ids
        self.pad.fill_(pad)
        if self.seen is not None:
            self.seen.zero_()
            for b, p in enumerate(prompts):
                self.seen[b, p] = True
        if self.teacher is not None:
            self.teacher.copy_(teacher)

    def choose(self, logits: torch.Tensor, config: SamplingConfig) -> None:
        """Pick and record the tokens of the current position from logits (B, V); advance `step`. Greedy
        decoding on CUDA (no teacher tokens, no repetition penalty) runs it all as one Triton launch."""
        if self.argmax_keys is not None and config.greedy and config.repetition_penalty == 1.0 and self.teacher is None:
            from mambakit.generation.triton_greedy import greedy_choose

            greedy_choose(logits, self)
            self.step.add_(1)
        else:
            self.choose_with_torch_ops(logits, config)

    def choose_with_torch_ops(self, logits: torch.Tensor, config: SamplingConfig) -> None:
        """`choose` as torch ops, for every sampling option (the reference of the one-launch greedy path)."""
        t = self.step
        tokens = sample(logits, config, self.seeds, t, self.seen)
        if self.teacher is not None:
            position = self.prompt_lengths + t
            forced = self.teacher.gather(1, position.clamp(max=self.teacher.shape[1] - 1)[:, None]).squeeze(1)
            tokens = torch.where(position < self.teacher.shape[1], forced, tokens)
        tokens = torch.where(self.finished, self.pad, tokens)
        active = ~self.finished
        finished = self.finished | torch.isin(tokens, self.stop_ids) | (self.budgets <= t + 1)
        column = t.view(1)
        self.sequence.index_copy_(1, column, tokens[:, None])
        self.active.index_copy_(1, column, active[:, None])
        self.finished_at.index_copy_(1, column, finished[:, None])
        self.tokens.copy_(tokens)
        self.finished.copy_(finished)
        self.nan.logical_or_(logits.isnan().any())
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        self.step.add_(1)


def decode_step(model: nn.Module, cache: InferenceCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (batch,), advance the cache in place and return the next logits (batch, vocab)."""
    logits = model(tokens[:, None], inference_params=cache, num_last_tokens=1).logits[:, -1]
    cache.seqlen_offset += 1
    cache.lengths_per_sample += 1
    return logits


class Decoder:
    """A cache and buffers for `batch` rows, and the step that advances them by one token.

    `advance()` feeds `buffers.tokens`, chooses the next tokens and returns the logits they came from
    (a tensor that the next `advance()` may overwrite). With `graph=True` (CUDA) the step is captured
    once and each `advance()` replays it; with `compiled=True` (not with a graph) the eager step runs
    through `torch.compile`. With `sampling=None` the step only runs the model (the caller
    samples, e.g. rows with different options); `cache`: decode into this one (e.g. a view of the first
    `batch` rows of a larger cache, shared by decoders of several batch sizes) instead of a new one;
    `cache_dtypes`: the new one's (None: `CacheDtypes()`).
    """

    def __init__(self, model: nn.Module, batch: int, max_seqlen: int, steps: int, vocab: int, stop_slots: int,
                 sampling: SamplingConfig | None, cache_dtypes: CacheDtypes | None, teacher_len: int | None,
                 graph: bool, cache: InferenceCache | None = None, compiled: bool = False):
        self._model = weakref.ref(model)  # kept decoders must not keep their model alive
        self.vocab, self.sampling = vocab, sampling
        if cache is None:
            dtypes = cache_dtypes or CacheDtypes()
            cache = InferenceCache.allocate(model, batch, max_seqlen, dtype=dtypes.states, ssm_dtype=dtypes.ssm)
        self.cache = cache
        device = self.cache.lengths_per_sample.device
        penalty = sampling is not None and sampling.repetition_penalty != 1.0
        self.buffers = DecodeBuffers.allocate(batch, steps, vocab, stop_slots, device, penalty, teacher_len)
        self.graph = None
        self._graph_logits = None
        # Compiled once per decoder (kept, as graph decoders are): dynamo guards on this decoder's buffers.
        # The plain function, not the bound method: a decoder that held itself would be a reference cycle,
        # its cache kept on the GPU until Python's cycle collector runs.
        # No inductor size asserts: dynamo's guards already check every input's sizes and strides, and the
        # asserts cost ~0.2 ms of a 130M model's 7-8 ms CPU step (decode_profile_cpu.py, 327 calls a step).
        self._compiled_step = (torch.compile(Decoder._streamed_step, options={"size_asserts": False})
                               if compiled else None)
        # What the compiled step reads: the cache's states with an offset that stays 1 (the one-token path);
        # traced with the real offset, dynamo would specialize on it and compile again at the next token.
        self._step_cache = dataclasses.replace(self.cache, seqlen_offset=1) if compiled else None
        if graph:
            self._capture()

    def _eager_step(self, cache: InferenceCache) -> torch.Tensor:
        logits = decode_step(self._model(), cache, self.buffers.tokens)[:, : self.vocab]
        if self.sampling is not None:
            self.buffers.choose(logits, self.sampling)
        return logits

    def _streamed_step(self, cache: InferenceCache) -> torch.Tensor:
        # What torch.compile traces: one-row products as reductions inductor streams (ops/rowwise_linear).
        with RowwiseProducts():
            return self._eager_step(cache)

    def advance(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self._graph_logits
        if self._compiled_step is None:
            return self._eager_step(self.cache)
        self._step_cache.seqlen_offset = 1  # decode_step advanced it last time; the real offset is self.cache's
        logits = self._compiled_step(self, self._step_cache)
        self.cache.seqlen_offset += 1
        return logits

    def _capture(self) -> None:
        """Warm up (Triton compiles, cuBLAS picks its kernels) on a side stream, capture one step, then
        zero what the warm-up wrote. The graph's kernels overlap their predecessors (`overlapped_launches`):
        its weights stay fixed and only its steps write the states."""
        self.cache.seqlen_offset = 1  # the mixers take their one-token step path
        self.buffers.budgets.fill_(self.buffers.sequence.shape[1])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with overlapped_launches():
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._eager_step(self.cache)
                    self.buffers.step.zero_()  # buffers may hold a single step
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._graph_logits = self._eager_step(self.cache)
        self.cache.reset()


def get_decoder(model: nn.Module, batch: int, max_seqlen: int, steps: int, vocab: int, n_stop_ids: int,
                sampling: SamplingConfig, cache_dtypes: CacheDtypes | None, teacher_len: int | None,
                graph: bool, compiled: bool = False) -> Decoder:
    """A decoder for these shapes. Graph and compiled decoders are kept (a capture costs a few eager steps,
    a compilation seconds) and a later call with the same key reuses one, its cache reset. Sizes are
    rounded up (steps and max_seqlen to a power of two, stop ids to a multiple of STOP_ID_SLOTS), eager
    ones too: both then run the same kernels on the same shapes (an attention layer's KV cache has
    max_seqlen rows), so they agree exactly."""
    max_seqlen, steps = _round_up_pow2(max_seqlen), _round_up_pow2(steps)
    stop_slots = -(-max(n_stop_ids, 1) // STOP_ID_SLOTS) * STOP_ID_SLOTS
    args = (model, batch, max_seqlen, steps, vocab, stop_slots, sampling, cache_dtypes, teacher_len)
    if not (graph or compiled) or steps == 1:  # one token comes from the prefill alone: nothing to replay
        return Decoder(*args, graph=False)
    if compiled:
        check_compiler(model)
    weights = tuple((p.data_ptr(), p.dtype, p.shape) for p in model.parameters())
    key = (*args[1:], graph, compiled, weights)
    kept = _decoders.setdefault(model, OrderedDict())
    decoder = kept.pop(key, None)
    if decoder is None:
        while len(kept) >= MAX_DECODERS_PER_MODEL:
            kept.popitem(last=False)
        decoder = Decoder(*args, graph=graph, compiled=compiled)
    else:
        decoder.cache.reset()
    kept[key] = decoder
    return decoder


def check_compiler(model: nn.Module) -> None:
    """compile=True on the CPU needs the C++ compiler inductor calls ($CXX, else g++ or clang++)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c):
        raise FileNotFoundError("compile: torch.compile's CPU kernels need a C++ compiler ($CXX, g++ or clang++); "
                           "none was found: install one or decode without compile")


def release_decoders(model: nn.Module) -> None:
    """Free the decoders (caches and CUDA graphs) kept for `model`."""
    _decoders.pop(model, None)


def _round_up_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
