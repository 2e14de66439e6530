"""Generated tokens to OpenAI text: stop tokens dropped, text cut before the first stop string, and
while streaming, nothing sent that could turn out to be the start of a stop string."""
from __future__ import annotations

from mambakit.generation import TextStream


class TextOutput:
    """One choice's text. `push(token)` returns the text that is now safe to send ('' while it is held back),
    or None for a token that is not part of the answer (a stop token, a token after a stop string);
    `finish()` returns the rest."""

    def __init__(self, tokenizer, stop_ids: frozenset[int], stop_strings: tuple[str, ...]):
        self.stream = TextStream(tokenizer)
        self.stop_ids, self.stop_strings = stop_ids, stop_strings
        # Text that may still become a stop string is held back: at most the longest one minus a character.
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.text = ""
        self.sent = 0
        self.cut: int | None = None  # where the first stop string starts, once one appeared
        self.searched = 0  # text searched so far: a stop string appearing now ends after it

    def push(self, token: int) -> str | None:
        if token in self.stop_ids or self.cut is not None:
            return None
        self.text += self.stream.push(token)
        return self._release(len(self.text) - self.hold)

    def finish(self) -> str:
        if self.cut is None:
            self.text += self.stream.flush()
        return self._release(len(self.text))

    def _release(self, limit: int) -> str:
        if self.cut is None:
            start = max(self.searched - self.hold, 0)
            found = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
            self.cut = min(found) if found else None
            self.searched = len(self.text)
        if self.cut is not None:
            limit = self.cut
        piece = self.text[self.sent:max(limit, self.sent)]
        self.sent += len(piece)
        return piece
