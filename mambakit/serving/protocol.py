"""The OpenAI request format, checked once: a JSON body in, a `CompletionRequest` out, or a `RequestError`
naming the field (rendered as an OpenAI error body with status 400).

Sampling follows OpenAI's defaults (temperature 1, top_p 1, every token allowed) mapped onto
`SamplingConfig`; temperature 0 is greedy. So a request gives what `generate(..., top_k=0,
temperature=..., top_p=..., seed=...)` gives for the same prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from mambakit.generation import SamplingConfig

# OpenAI's default max_tokens for /v1/completions.
DEFAULT_MAX_TOKENS = 16
# Fields of the OpenAI API this server does not implement: accepted only at their "off" value.
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},), "echo": (False,), "suffix": ("",),
               "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "tools": ([],),
               "response_format": ({"type": "text"},)}


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI error `type`, the offending field `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: prompt tokens (each prompt), new tokens, choices per prompt."""

    vocab_size: int
    max_prompt_tokens: int
    max_tokens: int
    max_n: int = 16


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request. prompts: token ids, one list per prompt (a chat is one prompt); each gives `n`
    choices, choice i of prompt p using seed `seed + p * n + i` (generate's row seeds for the flattened
    batch). seed None: random. stop: strings that end a choice (cut from its text)."""

    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    sampling: SamplingConfig
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def parse_completion(body, tokenizer, limits: Limits, chat_template=None) -> CompletionRequest:
    """Check a /v1/completions body (or, with `chat_template`, a /v1/chat/completions one)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in (None, *off):
            raise RequestError(f"{name}: not supported by this server, got {body[name]!r}", name)
    if chat_template is None:
        prompts = _prompts(body, tokenizer)
        max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, limits.max_tokens)
    else:
        try:
            prompts = [tokenizer.encode(chat_template(_messages(body)))]
        except ValueError as e:  # the template refused the conversation (e.g. roles out of order)
            raise RequestError(f"messages: the chat template refused them: {e}", "messages") from None
        default = limits.max_tokens
        max_tokens = _int(body, "max_completion_tokens", None, 1, limits.max_tokens)
        max_tokens = max_tokens if max_tokens is not None else _int(body, "max_tokens", default, 1, limits.max_tokens)
    for p, ids in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
        if not ids:
            raise RequestError(f"{where}: must hold at least one token, got an empty prompt", "prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(f"{where}: at most {limits.max_prompt_tokens} tokens (--max-prompt-tokens), "
                               f"got {len(ids)}", "prompt")
        bad = [i for i in ids if not 0 <= i < limits.vocab_size]
        if bad:
            raise RequestError(f"{where}: token ids must be in [0, {limits.vocab_size}), got {bad[0]}", "prompt")
    temperature = _real(body, "temperature", 1.0)
    top_p = _real(body, "top_p", 1.0)
    top_k = _int(body, "top_k", 0, -1, None)
    try:
        sampling = SamplingConfig(temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                                  min_p=_real(body, "min_p", 0.0),
                                  repetition_penalty=_real(body, "repetition_penalty", 1.0))
    except ValueError as e:  # SamplingConfig names the field first: "top_p: expected ..."
        raise RequestError(str(e), str(e).split(":")[0]) from None
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError(f"stop: expected a non-empty string or a list of up to 4, got {body.get('stop')!r}", "stop")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise RequestError(f"stream_options: expected {{'include_usage': bool}}, got {options!r}", "stream_options")
    return CompletionRequest(
        prompts=tuple(tuple(p) for p in prompts), max_tokens=max_tokens, sampling=sampling,
        seed=_int(body, "seed", None, 0, 2**62), n=_int(body, "n", 1, 1, limits.max_n), stop=tuple(stop),
        stream=_bool(body, "stream", False), include_usage=bool((options or {}).get("include_usage", False)),
        ignore_eos=_bool(body, "ignore_eos", False))


def _prompts(body: dict, tokenizer) -> list[list[int]]:
    """The prompt field as token-id lists: a string, a list of strings, a list of ids, a list of id lists."""
    if "prompt" not in body:
        raise RequestError("prompt: required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [tokenizer.encode(p) for p in prompt]
        if all(_is_int(i) for i in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and all(_is_int(i) for i in p) for p in prompt):
            return [list(p) for p in prompt]
    if prompt == []:
        raise RequestError("prompt: must hold at least one prompt, got []", "prompt")
    raise RequestError("prompt: expected a string, a list of strings, a list of token ids or a list of token-id "
                       f"lists, got {_describe(prompt)}", "prompt")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise RequestError("messages: expected a non-empty list of {'role': str, 'content': str}, "
                           f"got {_describe(messages)}", "messages")
    return messages


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _describe(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(body: dict, name: str, default, low: int, high: int | None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(f"{name}: expected an integer {bound}, got {_describe(value)}", name)
    return int(value)


def _real(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise RequestError(f"{name}: expected a finite number, got {_describe(value)}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"{name}: expected true or false, got {_describe(value)}", name)
    return value
