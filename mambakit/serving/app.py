"""The HTTP API (FastAPI): OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health
and /metrics. Handlers check the request, hand its choices to the `Scheduler` as jobs and relay the
tokens it delivers, as one JSON body or as server-sent events in the OpenAI chunk format."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as encode_json_string  # json.dumps' own, for a str
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mambakit.serving.chat import ChatTemplate
from mambakit.serving.metrics import Metrics
from mambakit.serving.output import TextOutput
from mambakit.serving.protocol import CompletionRequest, Limits, RequestError, parse_completion
from mambakit.serving.scheduler import Delivery, Job, Scheduler


@dataclass(frozen=True)
class ServedModel:
    """What the API knows of the model: its name in requests, tokenizer, limits and chat template (or None)."""

    name: str
    tokenizer: object
    limits: Limits
    chat_template: ChatTemplate | None = None


# Put in a request's token queue when its client disconnects.
DISCONNECTED = object()


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


def create_app(scheduler: Scheduler, served: ServedModel, metrics: Metrics) -> FastAPI:
    """The FastAPI application; the caller starts and stops `scheduler` (see `mambakit.cli.serve`). On startup
    the scheduler's relay becomes this event loop's (`loop_relay`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.relay = loop_relay(asyncio.get_running_loop())
        yield

    app = FastAPI(title="mambakit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(CountRequests, metrics=metrics)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(RequestError(str(e.detail), status=e.status_code).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        if not scheduler.accepting:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "mambakit"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request, served)
        return await _answer(request, parse_completion(body, served.tokenizer, served.limits), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request, served)
        if served.chat_template is None:
            raise RequestError("this model's tokenizer has no chat template (tokenizer_config.json "
                               "'chat_template', or --chat-template); use /v1/completions", "messages")
        return await _answer(request, parse_completion(body, served.tokenizer, served.limits, served.chat_template),
                             chat=True)

    async def _answer(request: Request, parsed: CompletionRequest, chat: bool):
        run = Run(scheduler, served, parsed)
        if parsed.stream:
            return EventStream(_sse(run, request, chat), media_type="text/event-stream")
        try:
            async for _ in run.events(request):
                pass
        except ClientGone:
            return JSONResponse(RequestError("client closed the connection", status=499).body(), status_code=499)
        return _full_response(run, chat)

    return app


class EventStream(StreamingResponse):
    """A StreamingResponse without starlette's disconnect-listening task (a task group and a second receiver a
    request): `Run.events` already ends the stream when the client goes away."""

    async def __call__(self, scope, receive, send):
        await self.stream_response(send)


class CountRequests:
    """ASGI middleware counting answers by endpoint and status (plain ASGI: starlette's @app.middleware("http")
    would pass every streamed chunk through one more memory stream, a cost per token)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.record_request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def loop_relay(loop: asyncio.AbstractEventLoop) -> Callable[[list[Delivery]], None]:
    """A scheduler relay running the jobs' `deliver` on `loop`: one thread-safe wakeup per batch of
    deliveries (a decode step's tokens for every row), not one per token."""
    def deliver_all(deliveries: list[Delivery]) -> None:
        for job, token, finish in deliveries:
            job.deliver(token, finish)

    def relay(deliveries: list[Delivery]) -> None:
        try:
            loop.call_soon_threadsafe(deliver_all, deliveries)
        except RuntimeError:  # the event loop has closed (shutdown): nobody waits for these tokens
            pass
    return relay


async def _json_body(request: Request, served: ServedModel) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if isinstance(body, dict) and body.get("model") not in (None, served.name):
        raise RequestError(f"model: this server serves {served.name!r}, got {body['model']!r}", "model",
                           status=404, code="model_not_found")
    return body


class Run:
    """The jobs of one request (prompts x n choices) and their text as it arrives."""

    def __init__(self, scheduler: Scheduler, served: ServedModel, parsed: CompletionRequest):
        self.scheduler, self.parsed, self.model_name = scheduler, parsed, served.name
        self.id = uuid.uuid4().hex[:24]
        tokenizer = served.tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        stop_ids = frozenset() if parsed.ignore_eos or eos is None else frozenset([eos])
        seed = parsed.seed if parsed.seed is not None else scheduler.random_seed()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs, self.outputs = [], []
        for index, prompt in enumerate(p for p in parsed.prompts for _ in range(parsed.n)):
            def deliver(token, finish, index=index):  # on the event loop (loop_relay)
                self.queue.put_nowait((index, token, finish))
            self.jobs.append(Job(list(prompt), parsed.max_tokens, parsed.sampling, seed + index, stop_ids,
                                 parsed.stop, deliver))
            self.outputs.append(TextOutput(tokenizer, stop_ids, parsed.stop))
        self.texts = [""] * len(self.jobs)
        self.finish_reasons: list[str | None] = [None] * len(self.jobs)
        scheduler.submit(self.jobs)

    async def events(self, request: Request) -> AsyncIterator[list[tuple[int, str, str | None]]]:
        """Lists of (choice index, new text, finish reason or None), each holding what arrived since the
        last one (a stream behind the decode loop catches up in one write): one item per generated token
        of the answer (its text '' while held back: an incomplete character or a possible stop string),
        then one with the finish reason per choice; cancels the jobs when the client goes away (ClientGone)
        or the consumer stops early."""
        gone = asyncio.ensure_future(_put_on_disconnect(request, self.queue))
        remaining = len(self.jobs)
        try:
            while remaining:
                arrived = [await self.queue.get()]
                while not self.queue.empty():
                    arrived.append(self.queue.get_nowait())
                batch = []
                for item in arrived:
                    if not remaining:
                        break
                    if item is DISCONNECTED:
                        raise ClientGone()
                    event = self._record(*item)
                    if event is None:  # a stop token: no text, no chunk
                        continue
                    finish = event[2]
                    if finish is not None:
                        remaining -= 1
                        if finish == "error":
                            raise RequestError("the model failed on this request (NaN logits or a scheduler "
                                               "error)", status=500, type="server_error")
                    batch.append(event)
                if batch:
                    yield batch
        finally:
            gone.cancel()
            if remaining:
                self.scheduler.cancel(self.jobs)

    def _record(self, index: int, token: int | None, finish: str | None) -> tuple[int, str, str | None] | None:
        """A delivery's (index, new text, finish reason), its text and finish reason kept; None for a stop
        token (it has no text)."""
        output = self.outputs[index]
        piece = output.push(token) if finish is None else output.finish()
        if piece is None:
            return None
        self.texts[index] += piece
        if finish is not None:
            self.finish_reasons[index] = finish
        return index, piece, finish

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.parsed.prompts)
        completion = sum(len(job.generated) for job in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _put_on_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Put DISCONNECTED in `queue` when the client disconnects (the body has been read: the next message
    is the disconnect), so one queue carries tokens and the end of the client alike."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(DISCONNECTED)


def _full_response(run: Run, chat: bool) -> dict:
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(run.texts, run.finish_reasons))]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(run.texts, run.finish_reasons))]
    return {"id": ("chatcmpl-" if chat else "cmpl-") + run.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": run.model_name, "choices": choices, "usage": run.usage()}


class ChunkFormat:
    """The SSE chunks of one stream, as `json.dumps` writes them. A token's chunk (the hot path: one per
    token per stream) is its template's constant parts around the index, text and finish reason (one
    json.dumps of a string instead of a dict's), the parts cut from json.dumps of a chunk with marker values."""

    MARKERS = ("\x00index", "\x00piece", "\x00finish")

    def __init__(self, run: Run, chat: bool):
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + run.id,
                     "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                     "model": run.model_name}
        self.include_usage, self.chat = run.parsed.include_usage, chat
        template = self.chunk([self.choice(*self.MARKERS)])
        for marker in self.MARKERS:
            template = template.replace(json.dumps(marker), "\x00")
        self.parts = template.split("\x00")

    def choice(self, index, piece, finish) -> dict:
        content = {"delta": {"content": piece}} if self.chat else {"text": piece, "logprobs": None}
        return {"index": index, **content, "finish_reason": finish}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """Any chunk: these choices (and the usage where the request asked for it in every chunk)."""
        body = {**self.head, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def token(self, index: int, piece: str, finish: str | None) -> str:
        """The chunk of one choice's new text, equal to chunk([choice(index, piece, finish)])."""
        head, after_index, after_piece, tail = self.parts
        finish = "null" if finish is None else encode_json_string(finish)
        return f"{head}{index}{after_index}{encode_json_string(piece)}{after_piece}{finish}{tail}"


async def _sse(run: Run, request: Request, chat: bool) -> AsyncIterator[str]:
    """The OpenAI event stream: one chunk per generated token, its text possibly '' (as vLLM: a client sees
    every token arrive; the chunks that arrived together are written together), a last one per choice with
    its finish_reason, a usage chunk when asked (stream_options.include_usage), then [DONE]."""
    chunks = ChunkFormat(run, chat)
    if chat:
        yield chunks.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            for i in range(len(run.jobs))])
    try:
        async for batch in run.events(request):  # one write per batch, one chunk per token in it
            yield "".join(chunks.token(index, piece, finish) for index, piece, finish in batch)
    except ClientGone:
        return
    except RequestError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
        return
    if run.parsed.include_usage:
        yield chunks.chunk([], run.usage())
    yield "data: [DONE]\n\n"
