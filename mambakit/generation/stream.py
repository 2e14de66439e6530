"""Streaming text as tokens arrive, never cutting a character in half."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from mambakit.generation.generate import Step, decode_steps, prompt_rows
from mambakit.generation.options import GenerationOptions

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """Token ids in, text pieces out. A piece is held back while its last character is incomplete
    (a multi-byte UTF-8 character split over tokens decodes to U+FFFD until its last byte arrives).

    Decoding from the previous piece's tokens onwards (not token by token) keeps the spacing that
    tokenizers attach to word boundaries.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the tokens decoded for context
        self.read = 0  # tokens already emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """The text still held back (a trailing incomplete character comes out as U+FFFD)."""
        return self._emit(self.tokenizer.decode(self.ids[self.prefix:]))

    def pending(self) -> str:
        """The text held back so far, as `flush` would return it, without returning it."""
        if self.read == len(self.ids):
            return ""
        return self._unread(self.tokenizer.decode(self.ids[self.prefix:]))

    def _emit(self, text: str) -> str:
        piece = self._unread(text)
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def _unread(self, text: str) -> str:
        """`text` (the decoding of ids[prefix:]) less the part already emitted."""
        return text[len(self.tokenizer.decode(self.ids[self.prefix:self.read])):]


class StopStringWatch:
    """Whether the decoded text of the tokens pushed so far holds one of `stop_strings` (generate()'s rule),
    in O(new text) a token instead of decoding the whole text each time: an occurrence that the last token
    created must end after the text emitted before it, so only that and the longest stop string's worth of
    characters before it are searched."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.stream = TextStream(tokenizer)
        self.stop_strings = tuple(stop_strings)
        self.keep = max(map(len, self.stop_strings)) - 1
        self.tail = ""  # the last `keep` characters of the emitted text

    def push(self, token_id: int) -> bool:
        emitted = self.tail + self.stream.push(token_id)
        window = emitted + self.stream.pending()
        self.tail = emitted[-self.keep:] if self.keep else ""
        return any(s in window for s in self.stop_strings)


def stream(model: nn.Module, prompt: str | Sequence[int], tokenizer=None, **options) -> Iterator[str]:
    """Generate from one prompt (text or token ids) and yield the new text piece by piece.

    `tokenizer` defaults to `model.tokenizer` (when the loader attached one); `options` are `generate`'s
    (`GenerationOptions`: max_new_tokens, top_k, temperature, top_p, seed, stop_strings, ...), greedy unless
    top_k != 1. Stop tokens are not printed.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("tokenizer: needed to turn tokens into text, got None and the model has none")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    if isinstance(ids, torch.Tensor) and ids.dim() != 1:
        raise ValueError(f"prompt: stream takes one prompt (L,), got shape {tuple(ids.shape)}")
    prompts = prompt_rows([ids], next(model.parameters()).device)
    config = GenerationOptions(tokenizer=tokenizer, **options)
    yield from stream_text(decode_steps(model, prompts, config), tokenizer, config.stop_ids(prompts[0].device))


def stream_text(steps: Iterable[Step], tokenizer, stop_ids: torch.Tensor) -> Iterator[str]:
    """The text of row 0 of `steps` (from `iterate_tokens`), piece by piece, without its stop tokens."""
    text = TextStream(tokenizer)
    for step in steps:
        token = step.tokens[0]
        if bool(step.active[0]) and not bool(torch.isin(token, stop_ids)):
            piece = text.push(int(token))
            if piece:
                yield piece
    tail = text.flush()
    if tail:
        yield tail
