"""Bad requests get a 400 (404 for another model) with an OpenAI error body naming the field, and the
server keeps serving."""
import httpx
import pytest

from .conftest import MAX_PROMPT_TOKENS, MAX_TOKENS


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": [3, 300]}, "prompt"),
    ({"prompt": [3, -1]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": "x" * (MAX_PROMPT_TOKENS + 1)}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "seed": -3}, "seed"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "stop": ["a", 3]}, "stop"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "hi", "stream_options": {"include_usage": "y"}}, "stream_options"),
])
def test_bad_fields_get_a_400_naming_them(server, body, param):
    response = httpx.post(f"{server}/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b""])
def test_malformed_bodies_get_a_400(server, content):
    response = httpx.post(f"{server}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_another_model_is_404_and_the_server_keeps_serving(server):
    response = httpx.post(f"{server}/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert httpx.get(f"{server}/nowhere").json()["error"]["message"] == "Not Found"
