"""/v1/completions and /v1/chat/completions answer exactly what `generate` gives, streamed or not,
through httpx and the official `openai` client."""
import json
import random

import httpx
import pytest

from mambakit.serving.chat import load_chat_template
from mambakit.tokenizer import ByteTokenizer

from .conftest import MODEL_NAME, expected, running_server

openai = pytest.importorskip("openai")


def random_prompt(length: int) -> str:
    return "".join(random.choice("abcdefghij klmnop(),:=") for _ in range(length))


def stream_events(client: httpx.Client, url: str, body: dict) -> list[dict]:
    """The JSON chunks of an SSE stream, checking it ends with [DONE]."""
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9},
                                      {"temperature": 1.3, "top_k": 20, "min_p": 0.02, "repetition_penalty": 1.2}])
def test_completion_equals_generate_streamed_and_not(server, model, sampling):
    prompt = random_prompt(random.randint(3, 30))
    seed = random.randrange(2**31)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "seed": seed, **sampling}
    (text,), (count,), (finish,) = expected(model, [ByteTokenizer().encode(prompt)], 24, seed=seed, **sampling)
    with httpx.Client(base_url=server, timeout=30) as client:
        answer = client.post("/v1/completions", json=body).json()
        assert answer["object"] == "text_completion" and answer["model"] == MODEL_NAME
        assert answer["choices"][0]["text"] == text
        assert answer["choices"][0]["finish_reason"] == finish
        assert answer["usage"] == {"prompt_tokens": len(prompt.encode()), "completion_tokens": count,
                                   "total_tokens": len(prompt.encode()) + count}
        chunks = stream_events(client, "/v1/completions",
                               {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] == answer["choices"][0]["finish_reason"] and set(reasons[:-1]) <= {None}
    # A chunk per generated token, text or not (random bytes are often incomplete UTF-8), the stop token aside.
    assert len(reasons) - 1 == count - (reasons[-1] == "stop")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]


def test_batch_of_prompts_with_n_choices_equals_one_generate_call(server, model):
    prompts = [[random.randrange(256) for _ in range(random.randint(1, 12))] for _ in range(3)]
    seed = random.randrange(2**31)
    with httpx.Client(base_url=server, timeout=30) as client:
        answer = client.post("/v1/completions", json={"prompt": prompts, "n": 2, "max_tokens": 10, "seed": seed,
                                                      "temperature": 0.9}).json()
    # Choice i of prompt p is row p * n + i of generate's batch, with generate's row seeds seed + row.
    texts, counts, _ = expected(model, [p for p in prompts for _ in range(2)], 10, seed=seed, temperature=0.9)
    assert [c["index"] for c in answer["choices"]] == list(range(6))
    assert [c["text"] for c in answer["choices"]] == texts
    assert answer["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert answer["usage"]["completion_tokens"] == sum(counts)


def test_stop_strings_cut_the_text_and_end_the_choice(server, model):
    prompt = random_prompt(8)
    (full,), _, _ = expected(model, [ByteTokenizer().encode(prompt)], 40, ignore_eos=True, temperature=0.0)
    stop = full[10:12]  # a string the greedy continuation is known to reach
    cut = full[: full.find(stop)]
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": [stop, "\x00never"]}
    with httpx.Client(base_url=server, timeout=30) as client:
        answer = client.post("/v1/completions", json=body).json()["choices"][0]
        chunks = stream_events(client, "/v1/completions", {**body, "stream": True})
    assert answer == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut


def test_openai_client_streams_and_lists_models(server, model):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    prompt = random_prompt(12)
    (text,), _, _ = expected(model, [ByteTokenizer().encode(prompt)], 16, seed=7)
    completion = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, seed=7)
    assert completion.choices[0].text == text
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, seed=7, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == text


def test_chat_completions_render_the_checkpoint_template(model, tmp_path):
    template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
                "<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": random_prompt(10)}]
    prompt = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
    (text,), _, _ = expected(model, [ByteTokenizer().encode(prompt)], 12, seed=3, temperature=0.7)
    with running_server(model, chat_template=load_chat_template(tmp_path)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        answer = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, seed=3,
                                                temperature=0.7)
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == text
        assert answer.usage.prompt_tokens == len(prompt.encode())
        stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, seed=3,
                                                temperature=0.7, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == text
        refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "messages" and "no tools" in refused.json()["error"]["message"]


def test_chat_without_a_template_is_a_clear_400(server):
    response = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "chat template" in error["message"]
