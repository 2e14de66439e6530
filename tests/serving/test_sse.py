"""ChunkFormat: a token's chunk from the template is exactly json.dumps of the whole chunk, for any text."""
import json
import random
import types

import pytest

pytest.importorskip("fastapi")

from mambakit.serving.app import ChunkFormat  # noqa: E402


def random_text(rng: random.Random) -> str:
    alphabet = ['"', "\\", "\n", "\x00", "\x1f", "é", "\u2028", "😀", "a", " ", "{", "}", "data: "]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
def test_token_chunk_is_json_dumps_of_the_chunk(chat, include_usage):
    rng = random.Random()
    run = types.SimpleNamespace(id=random_text(rng) + "x", model_name=random_text(rng),
                                parsed=types.SimpleNamespace(include_usage=include_usage))
    chunks = ChunkFormat(run, chat)
    for _ in range(200):
        index, piece = rng.randrange(1000), random_text(rng)
        finish = rng.choice([None, "stop", "length"])
        line = chunks.token(index, piece, finish)
        assert line == chunks.chunk([chunks.choice(index, piece, finish)])
        assert line.startswith("data: ") and line.endswith("\n\n") and "\n" not in line[:-2]
        body = json.loads(line[len("data: "):])
        choice = body["choices"][0]
        assert (choice["delta"]["content"] if chat else choice["text"]) == piece
        assert (choice["index"], choice["finish_reason"]) == (index, finish)
        assert body["model"] == run.model_name and body["id"].endswith(run.id)
        assert ("usage" in body) == include_usage
