"""Serving: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra) over a continuous-batching
scheduler built on `mambakit.generation`. Start it with `mambakit serve --model DIR`."""
from mambakit.serving.metrics import Metrics
from mambakit.serving.protocol import CompletionRequest, Limits, RequestError, parse_completion
from mambakit.serving.scheduler import Job, Scheduler, SchedulerOptions

__all__ = ["CompletionRequest", "Job", "Limits", "Metrics", "RequestError", "Scheduler", "SchedulerOptions",
           "parse_completion"]
