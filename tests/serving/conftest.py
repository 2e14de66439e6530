"""A real server on 127.0.0.1 (uvicorn in a thread, a random port) over a tiny random Mamba-2, and
`expected`: what `generate` gives for the same request, to compare the server's answers with."""
import threading
import time
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from mambakit import MambaConfig, MambaLMHeadModel  # noqa: E402
from mambakit.generation import generate  # noqa: E402
from mambakit.generation.generate import vocab_size  # noqa: E402
from mambakit.serving import Limits, Metrics, Scheduler, SchedulerOptions  # noqa: E402
from mambakit.serving.app import ServedModel, create_app  # noqa: E402
from mambakit.tokenizer import ByteTokenizer  # noqa: E402

MODEL_NAME = "tiny"
MAX_PROMPT_TOKENS = 64
MAX_TOKENS = 10**6  # a "long" request never ends during a test: it is cancelled


def tiny_model() -> MambaLMHeadModel:
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=257, tie_embeddings=False,
                         ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8})
    model = MambaLMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits: greedy and sampled tokens vary with the context
    return model.eval()


@contextmanager
def running_server(model, chat_template=None, **options):
    """Yields (base URL, scheduler) of a server on a free port; stops it (and its scheduler) afterwards."""
    tokenizer = ByteTokenizer()
    metrics = Metrics()
    scheduler = Scheduler(model, SchedulerOptions(max_seqlen=MAX_PROMPT_TOKENS + MAX_TOKENS, **options), tokenizer,
                          metrics)
    served = ServedModel(MODEL_NAME, tokenizer, Limits(vocab_size(model), MAX_PROMPT_TOKENS, MAX_TOKENS), chat_template)
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, served, metrics), host="127.0.0.1", port=0,
                                           log_level="warning", timeout_graceful_shutdown=1))
    scheduler.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", scheduler
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        scheduler.stop()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def server(model):
    """The base URL of a server with the default options, shared by a module's tests."""
    with running_server(model, max_batch=16) as (url, _):
        yield url


def expected(model, prompts, max_tokens, seed=0, ignore_eos=False, **sampling):
    """generate()'s answers for `prompts` (token-id lists) in one call, with the server's defaults mapped as
    it maps them (OpenAI's: sampling with temperature 1, top_p 1, no top-k). max_tokens: an int or one per
    prompt (a row's first k tokens do not depend on its budget); seed: an int (row b: seed + b) or one per
    prompt. Returns (texts, new-token counts)."""
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **sampling}
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else max_tokens
    out = generate(model, prompts, max_new_tokens=max(budgets), seed=seed, return_dict_in_generate=True,
                   eos_token_id=[] if ignore_eos else None, tokenizer=ByteTokenizer(), **sampling)
    tokenizer = ByteTokenizer()
    news = [seq[len(p):len(p) + k] for seq, p, k in zip(out.sequences, prompts, budgets)]
    return [tokenizer.decode(new) for new in news], [len(new) for new in news]
