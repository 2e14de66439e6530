"""`mambakit serve` as a user runs it: a subprocess on a free port; SIGTERM drains running requests and
exits 0; bad flags are one line on stderr."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mambakit.cli import main
from mambakit.tokenizer import ByteTokenizer

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model().save_pretrained(path)
    ByteTokenizer().save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flag, value", [("--max-batch", "0"), ("--max-queue", "-1"), ("--max-tokens", "0"),
                                         ("--port", "70000"), ("--drain-timeout", "-1"),
                                         ("--state-dtype", "float64")])
def test_bad_flags_are_one_line_on_stderr(checkpoint, capsys, flag, value):
    assert main(["serve", "--model", str(checkpoint), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mambakit serve: error: {flag}")


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("mambakit serve: error:")


def test_sigterm_stops_accepting_drains_running_requests_and_exits_0(checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "mambakit", "serve", "--model", str(checkpoint), "--port",
                                str(port), "--max-tokens", "100000", "--drain-timeout", "60"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        chunks, started = [], threading.Event()

        def read_stream():
            body = {"prompt": "abc", "max_tokens": 2000, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        chunks.append(line)
                    started.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert started.wait(30)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # new connections are refused while the stream drains
            try:
                httpx.get(f"{url}/health", timeout=1)
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, "still accepting after SIGTERM"
            time.sleep(0.05)
        assert reader.is_alive(), "the stream ended before the refusal could be seen (raise max_tokens)"
        reader.join(60)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log = process.stdout.read().decode()
    assert chunks[-1] == "data: [DONE]", log
    events = [json.loads(line[len("data: "):]) for line in chunks if line.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 2000
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
