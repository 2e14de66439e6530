"""TextOutput: streamed pieces add up to the text cut before the first stop string, and no piece ever
holds the start of a stop string that then completes."""
import random

from mambakit.serving.output import TextOutput
from mambakit.tokenizer import ByteTokenizer


def test_stream_never_sends_what_a_stop_string_then_covers():
    tokenizer = ByteTokenizer()
    words = ["ab", "cd", "é", "END", "x", "EN"]
    text = "".join(random.choice(words) for _ in range(40))
    stops = ("END", "\u00e9x")
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    output = TextOutput(tokenizer, frozenset([256]), stops)
    sent = ""
    for token in tokenizer.encode(text) + [256]:
        sent += output.push(token) or ""
        assert text[:cut].startswith(sent)  # never past the cut, never a character split
    assert sent + output.finish() == text[:cut]


def test_a_held_back_token_gives_empty_text_and_a_stop_token_none():
    output = TextOutput(ByteTokenizer(), frozenset([256]), ())
    assert [output.push(t) for t in "é".encode()] == ["", "é"]  # the first byte is half a character
    assert output.push(256) is None
    output = TextOutput(ByteTokenizer(), frozenset([256]), ("END",))
    assert [output.push(t) for t in b"abcEN"] == ["", "", "a", "b", "c"]  # "EN" may start "END"
    assert output.finish() == "EN"
