"""Continuous batching: concurrent clients get their exact `generate` answers, late requests join a
running batch, disconnects free their rows and a full queue answers 429."""
import asyncio
import json
import random
import time

import httpx
import pytest
import torch

from .conftest import MAX_TOKENS, expected, running_server


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    assert len(values) == 1, f"{name} not in /metrics"
    return values[0]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


async def complete(client: httpx.AsyncClient, body: dict) -> str:
    """The choice's text, through a stream when body["stream"]."""
    if not body.get("stream"):
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    pieces = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[len("data: "):])["choices"][0]["text"])
    return "".join(pieces)


# cg on the CPU: eager decoders of bucketed batch sizes (on CUDA, graphs: test_gpu.py); bf16 SSM states too.
@pytest.mark.parametrize("cg, clients, state_dtype", [(False, 32, torch.float32), (True, 12, torch.float32),
                                                      (False, 12, torch.bfloat16)])
def test_32_concurrent_clients_get_their_generate_answers(model, cg, clients, state_dtype):
    greedy, sampled = {"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95}
    bodies = [{"prompt": [random.randrange(256) for _ in range(random.randint(1, 24))],
               "max_tokens": random.randint(1, 24), "seed": random.randrange(2**31), "stream": i % 3 == 0,
               **(greedy if i % 2 else sampled)} for i in range(clients)]
    answers = [None] * clients
    for sampling in (greedy, sampled):
        rows = [i for i, body in enumerate(bodies) if body["temperature"] == sampling["temperature"]]
        texts, _, _ = expected(model, [bodies[i]["prompt"] for i in rows], [bodies[i]["max_tokens"] for i in rows],
                            seed=[bodies[i]["seed"] for i in rows], state_dtype=state_dtype, **sampling)
        for i, text in zip(rows, texts):
            answers[i] = text

    async def run_clients(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(complete(client, body) for body in bodies))

    # Fewer rows than clients: some wait in the queue and join as rows leave.
    with running_server(model, max_batch=8, cg=cg, state_dtype=state_dtype) as (url, scheduler):
        assert scheduler.buckets == ([1, 2, 4, 8] if cg else [])
        assert asyncio.run(run_clients(url)) == answers
        assert metric(url, "mambakit_batch_occupancy_max") > 1
        assert metric(url, "mambakit_time_to_first_token_seconds_count") == clients


def test_a_request_arriving_mid_stream_joins_the_running_batch(model):
    prompt = [random.randrange(256) for _ in range(5)]
    (late_text,), _, _ = expected(model, [prompt], 8, seed=1)
    with running_server(model, max_batch=4) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        long_body = {"prompt": "x", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=long_body) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            assert metric(url, "mambakit_batch_occupancy_max") == 1
            answer = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "seed": 1}).json()
            assert answer["choices"][0]["text"] == late_text
            # The late request was decoded beside the long stream, which is still in flight.
            assert metric(url, "mambakit_batch_occupancy_max") >= 2
            later = next(line for line in lines if line.startswith("data: {"))
            assert json.loads(later[len("data: "):])["choices"][0]["finish_reason"] is None


def test_disconnect_cancels_the_request_and_frees_its_row(model):
    with running_server(model, max_batch=4) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            body = {"prompt": "abc", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()  # kept: dropping the iterator closes the response
                next(line for line in lines if line.startswith("data: {"))
                assert metric(url, "mambakit_batch_occupancy") == 1
        # The stream is closed long before its last token: the row is freed, generation stops.
        wait_for(lambda: metric(url, "mambakit_batch_occupancy") == 0)
        tokens_at_close = metric(url, "mambakit_generation_tokens_total")
        time.sleep(0.2)
        assert metric(url, "mambakit_generation_tokens_total") == tokens_at_close
        # A non-streaming client that gives up is cancelled too.
        try:
            httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=1.0)
        except httpx.ReadTimeout:
            pass
        wait_for(lambda: metric(url, "mambakit_batch_occupancy") == 0)
        tokens_at_timeout = metric(url, "mambakit_generation_tokens_total")
        assert tokens_at_timeout > tokens_at_close
        time.sleep(0.2)
        assert metric(url, "mambakit_generation_tokens_total") == tokens_at_timeout
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_a_full_queue_answers_429_and_the_server_recovers(model):
    with running_server(model, max_batch=1, max_queue=2) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            body = {"prompt": "abc", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()
                next(line for line in lines if line.startswith("data: {"))  # it holds the one row now
                with client.stream("POST", "/v1/completions", json={**body, "n": 2}) as waiting:
                    assert waiting.status_code == 200
                    assert metric(url, "mambakit_queue_depth") == 2
                    refused = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4})
                    assert refused.status_code == 429
                    assert refused.json()["error"]["code"] == "queue_full"
                    # More choices than the queue could ever hold: not worth a retry, a 400.
                    too_many = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2})
                    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        wait_for(lambda: metric(url, "mambakit_batch_occupancy") == 0 and metric(url, "mambakit_queue_depth") == 0)
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 4}, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
