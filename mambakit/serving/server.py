"""Putting it together: a model and tokenizer behind a uvicorn server, run in the foreground (the CLI)
or on a background thread (tests, benchmarks)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import uvicorn
from torch import nn

from mambakit.generation.generate import vocab_size
from mambakit.serving.app import ServedModel, create_app
from mambakit.serving.chat import ChatTemplate
from mambakit.serving.metrics import Metrics
from mambakit.serving.protocol import Limits
from mambakit.serving.scheduler import Scheduler, SchedulerOptions


@dataclass(frozen=True)
class ServerOptions:
    """Everything `mambakit serve` takes besides the model: the scheduler's options (its max_seqlen is
    max_prompt_tokens + max_tokens; cg: bucketed CUDA-graph decoding, None: on CUDA; state_dtype: of the SSM
    states; threads: torch's CPU threads of the thread that runs the model), request limits,
    the address and the SIGTERM drain timeout."""

    name: str = "model"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    max_queue: int = 256
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048
    prefill_chunk: int = 2048
    drain_timeout: float = 30.0
    cg: bool | None = None
    state_dtype: torch.dtype = torch.float32
    threads: int | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port: expected an int in [0, 65535], got {self.port}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"--drain-timeout: expected seconds >= 0, got {self.drain_timeout}")


def build_server(model: nn.Module, tokenizer, options: ServerOptions,
                 chat_template: ChatTemplate | None = None) -> tuple[uvicorn.Server, Scheduler]:
    """A uvicorn server for the API over `model` and its scheduler (not started yet)."""
    metrics = Metrics()
    scheduler = Scheduler(model, SchedulerOptions(options.max_batch, options.max_queue,
                                                  options.max_prompt_tokens + options.max_tokens,
                                                  options.prefill_chunk, options.cg, options.state_dtype,
                                                  options.threads),
                          tokenizer, metrics)
    served = ServedModel(options.name, tokenizer,
                         Limits(vocab_size(model), options.max_prompt_tokens, options.max_tokens), chat_template)
    config = uvicorn.Config(create_app(scheduler, served, metrics), host=options.host, port=options.port,
                            log_level=options.log_level, access_log=False,
                            timeout_graceful_shutdown=options.drain_timeout)
    return uvicorn.Server(config), scheduler


@contextmanager
def serve_in_background(model: nn.Module, tokenizer, options: ServerOptions,
                        chat_template: ChatTemplate | None = None) -> Iterator[tuple[str, Scheduler]]:
    """Run the server on a thread (port 0: a free one); yields (base URL, scheduler), stops both after."""
    server, scheduler = build_server(model, tokenizer, options, chat_template)
    scheduler.start()
    thread = threading.Thread(target=server.run, name="mambakit-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            scheduler.stop()
            raise RuntimeError(f"the server did not start on {options.host}:{options.port}")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{options.host}:{port}", scheduler
    finally:
        server.should_exit = True
        thread.join()
        scheduler.stop()
