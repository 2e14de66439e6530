"""On CUDA the scheduler replays a captured decode step per bucket of batch sizes; answers still equal
`generate`'s (GPU only)."""
import asyncio
import random

import httpx
import pytest

from .conftest import expected, running_server, tiny_model
from .test_batching import complete

pytestmark = pytest.mark.gpu


def test_cuda_graph_buckets_give_the_generate_answers():
    model = tiny_model().to("cuda")
    bodies = [{"prompt": [random.randrange(256) for _ in range(random.randint(1, 30))],
               "max_tokens": random.randint(1, 30), "seed": 1000 + i, "temperature": 0.0 if i % 2 else 0.8,
               "stream": i % 3 == 0} for i in range(20)]
    answers = [expected(model, [b["prompt"]], b["max_tokens"], seed=b["seed"], temperature=b["temperature"])[0][0]
               for b in bodies]

    async def clients(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(complete(client, body) for body in bodies))

    with running_server(model, max_batch=8) as (url, scheduler):
        assert scheduler.buckets == [1, 2, 4, 8]
        assert all(decoder.graph is not None for decoder in scheduler.decoders.values())
        assert asyncio.run(clients(url)) == answers
