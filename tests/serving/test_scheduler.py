"""The scheduler without HTTP, on every model kind: rows that join and leave a running batch get exactly
what `generate` gives each prompt alone (hybrids too: attention rows keep their own lengths)."""
import sys
import threading
from pathlib import Path

import pytest
import torch

from mambakit.generation import SamplingConfig, generate
from mambakit.serving import Job, Metrics, Scheduler, SchedulerOptions
from mambakit.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
from conftest import tiny_model  # noqa: E402  (the generation tests' tiny models of each kind)


@pytest.mark.parametrize("kind", ["mamba1", "hybrid"])
def test_rows_joining_and_leaving_get_their_generate_tokens(kind):
    model = tiny_model(kind)
    sampling = SamplingConfig(temperature=0.9, top_k=0, top_p=0.95, repetition_penalty=1.1)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (3, 17, 1, 9, 12, 5)]
    budgets = [6, 25, 1, 14, 9, 20]
    scheduler = Scheduler(model, SchedulerOptions(max_batch=3, max_seqlen=64), ByteTokenizer(), Metrics())
    done = threading.Semaphore(0)
    jobs = [Job(p, k, sampling, 40 + i, frozenset(), (), lambda token, finish: finish and done.release())
            for i, (p, k) in enumerate(zip(prompts, budgets))]
    scheduler.start()
    try:
        scheduler.submit(jobs[:4])  # three rows run, one waits; the rest arrive while they decode
        scheduler.submit(jobs[4:])
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    for i, job in enumerate(jobs):
        out = generate(model, [prompts[i]], max_new_tokens=budgets[i], seed=40 + i, eos_token_id=[], top_k=0,
                       temperature=0.9, top_p=0.95, repetition_penalty=1.1)[0]
        assert job.generated == out[len(prompts[i]):]
