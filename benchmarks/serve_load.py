"""Load test of `mambakit serve`: C concurrent streaming clients on loopback, each sending requests of a
fixed prompt length and output length, against the no-batching baseline (the same requests one at a
time through `generate`). Random weights, saved to a temporary checkpoint that `mambakit serve` loads in a
subprocess (so that the clients do not share the server's interpreter).

    python benchmarks/serve_load.py --shape tiny --concurrency 1,4,16,64        # the CPU
    python benchmarks/serve_load.py --shape micro --concurrency 64              # the server's overhead, CPU
    python benchmarks/serve_load.py --shape 130m --device cuda --concurrency 1,16,64

Per concurrency level: total generated tokens/s, time to first token (p50/p99), time per output token
after the first (p50/p99, per request) and the server's CPU time per generated token (Linux), split into
its main thread (uvicorn's event loop: HTTP, SSE, delivery) and the others (the scheduler, torch's
threads). Bounded: --requests per client and --max-seconds per level.
Rows are merged into benchmarks/results/serve_load-<device>.json and a table is printed last.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.bench.common import device_slug, format_table, save_rows
from mambakit.generation import generate, iterate_tokens
from mambakit.tokenizer import HFTokenizer

SHAPES = {
    # A decode step at 64 rows as short on the CPU as the 130M's on a GPU (1-2 ms): the server's own cost shows.
    "micro": dict(d_model=32, n_layer=2, vocab_size=257,
                  ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16}),
    "tiny": dict(d_model=256, n_layer=4, vocab_size=257,
                 ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 32}),
    "130m": dict(d_model=768, n_layer=24, vocab_size=50280,
                 ssm_cfg={"layer": "Mamba2", "d_state": 128, "headdim": 64}),
}
COLUMNS = ["shape", "mode", "concurrency", "client_processes", "requests_per_client", "prompt_len", "new_tokens", "total_tok_s",
           "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "loop_cpu_per_token_us",
           "other_cpu_per_token_us", "speedup"]


def word_tokenizer(vocab_size: int) -> HFTokenizer:
    """A word-level tokenizer with a word for each of the model's token ids ("w0", "w1", ...): every generated
    token is text, so each streamed chunk marks a token (a byte tokenizer gives ids >= 256 no text at all)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return HFTokenizer.from_tokenizers(tok)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(time to first token s, time per later token s, tokens) of one streamed request (a chunk per token)."""
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            if event["choices"]:
                last = time.perf_counter()
                first = first or last
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first - start, (last - first) / max(tokens - 1, 1), tokens


async def load(url: str, clients: int, requests: int, body: dict, deadline: float) -> list[tuple[float, float, int]]:
    """`clients` clients, each sending up to `requests` requests one after the other until the wall-clock
    `deadline`; every request's one_request figures."""
    results = []

    async def client_loop(client):
        for _ in range(requests):
            if time.time() > deadline:
                return
            results.append(await one_request(client, body))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results


def client_process(url: str, clients: int, requests: int, body: dict, start_at: float,
                   max_seconds: float) -> tuple[list[tuple[float, float, int]], float, float]:
    """One client process from wall-clock time `start_at`: its requests' figures and its (start, end) times."""
    time.sleep(max(0.0, start_at - time.time()))
    start = time.time()
    results = asyncio.run(load(url, clients, requests, body, start + max_seconds))
    return results, start, time.time()


def thread_cpu_seconds(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) process `pid` spent so far in its main thread and in all its others,
    from /proc (None where there is none)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return None
    main = others = 0.0
    for task in tasks.iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        if int(task.name) == pid:
            main += seconds
        else:
            others += seconds
    return main, others


def offered_load(pool: ProcessPoolExecutor, url: str, concurrency: int, requests: int, body: dict,
                 max_seconds: float, server_pid: int) -> dict:
    """`concurrency` clients spread over the pool's processes (an HTTP client parses a chunk per token: one
    process alone would be the bottleneck): tokens/s over the wall time, latency percentiles and the
    server's CPU time per generated token (the host cost, whatever the clients' share of the machine)."""
    processes = pool._max_workers
    shares = [n for n in (concurrency // processes + (i < concurrency % processes) for i in range(processes)) if n]
    start_at = time.time() + 0.2
    cpu_before = thread_cpu_seconds(server_pid)
    runs = [f.result() for f in [pool.submit(client_process, url, n, requests, body, start_at, max_seconds)
                                 for n in shares]]
    cpu_after = thread_cpu_seconds(server_pid)
    ttft, tpot, tokens = zip(*(r for results, _, _ in runs for r in results))
    wall = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
    figures = {"total_tok_s": sum(tokens) / wall, "client_processes": len(shares),
               "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
               "tpot_p50_ms": 1e3 * percentile(tpot, 0.5), "tpot_p99_ms": 1e3 * percentile(tpot, 0.99)}
    if cpu_before is not None and cpu_after is not None:
        figures["loop_cpu_per_token_us"] = 1e6 * (cpu_after[0] - cpu_before[0]) / sum(tokens)
        figures["other_cpu_per_token_us"] = 1e6 * (cpu_after[1] - cpu_before[1]) / sum(tokens)
    return figures


def one_at_a_time(model, prompt: list[int], new_tokens: int, requests: int) -> dict:
    """The no-batching baseline: the same requests through `generate`, one after the other."""
    device = next(model.parameters()).device
    generate(model, [prompt], max_new_tokens=new_tokens, top_k=0, seed=0)  # warm-up: the same decoder (its graph)
    ttft, tpot = [], []
    torch.set_grad_enabled(False)  # iterate_tokens' steps run where it is iterated: without autograd here
    start = time.perf_counter()
    for seed in range(requests):
        t0 = time.perf_counter()
        steps = iterate_tokens(model, [torch.tensor(prompt, device=device)], max_new_tokens=new_tokens, top_k=0,
                               seed=seed, eos_token_id=[])
        stamps = [time.perf_counter() for _ in steps]
        ttft.append(stamps[0] - t0)
        tpot.append((stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1))
    wall = time.perf_counter() - start
    return {"total_tok_s": requests * new_tokens / wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "tpot_p50_ms": 1e3 * statistics.median(tpot), "tpot_p99_ms": 1e3 * percentile(tpot, 0.99)}


@contextmanager
def serve_subprocess(model, checkpoint: str, args) -> Iterator[tuple[str, int]]:
    """`mambakit serve` on a free port over `model` saved to `checkpoint`; yields its base URL and process id."""
    model.save_pretrained(checkpoint)
    word_tokenizer(model.config.vocab_size).save(checkpoint)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mambakit", "serve", "--model", checkpoint, "--port", str(port),
               "--device", args.device, "--dtype", str(model.lm_head.weight.dtype).removeprefix("torch."),
               "--max-batch", str(args.max_batch), "--max-queue", "4096", "--max-tokens", str(args.new_tokens)]
    log = Path(checkpoint) / "server.log"
    with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text().strip().splitlines()[-20:]
                raise RuntimeError(f"the server did not start: {' '.join(command)}\n" + "\n".join(tail))
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def source_commit() -> str | None:
    """The checkout's commit (a '+' when the package or the benchmark scripts differ from it, results files
    aside): the server code a row measured; None outside a git checkout (or without git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)mambakit", ":(top)benchmarks/*.py")
        return head.stdout.strip() + ("+" if changed.stdout else "")
    except OSError:  # no git on this machine
        return None


def http_stack() -> str:
    """The HTTP parser and event loop that uvicorn picks here (the compiled ones when they are installed)."""
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{parser}+{loop}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per concurrency level")
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--client-processes", type=int, default=max(1, (os.cpu_count() or 1) // 4),
                        help="processes the clients are spread over (default: a quarter of the CPUs)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    model = MambaLMHeadModel(MambaConfig(**SHAPES[args.shape]), device=device, dtype=dtype).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,)).tolist()
    common = {"shape": args.shape, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "dtype": str(dtype).removeprefix("torch."), "max_batch": args.max_batch, "commit": source_commit(),
              "http_stack": http_stack()}
    base = {**common, "mode": "generate one at a time", "concurrency": 1, "client_processes": 0,
            "requests_per_client": args.baseline_requests,
            **one_at_a_time(model, prompt, args.new_tokens, args.baseline_requests)}
    rows = [base]
    body = {"prompt": prompt, "max_tokens": args.new_tokens, "ignore_eos": True, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    pool = ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn"))
    with pool, tempfile.TemporaryDirectory() as checkpoint, serve_subprocess(model, checkpoint, args) as (url, pid):
        offered_load(pool, url, args.client_processes, 1, body, args.max_seconds, pid)  # warm-up, every process too
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            figures = offered_load(pool, url, concurrency, args.requests, body, args.max_seconds, pid)
            rows.append({**common, "mode": "server", "concurrency": concurrency,
                         "requests_per_client": args.requests, **figures})
    slug = device_slug() if device.type == "cuda" else "cpu"
    out = args.out or Path(__file__).parent / "results" / f"serve_load-{slug}.json"
    save_rows(out, rows)
    # The speed-up over one request at a time (the target: >= 10x at 64 streams on a GPU).
    print(format_table([{**r, "speedup": r["total_tok_s"] / base["total_tok_s"]} for r in rows], COLUMNS))


if __name__ == "__main__":
    main()
