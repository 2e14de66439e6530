"""The scheduler without HTTP, on every model kind: rows that join and leave a running batch get exactly
what `generate` gives each prompt alone (hybrids too: attention rows keep their own lengths)."""
import sys
import threading
from pathlib import Path

import pytest
import torch

from mambakit.generation import SamplingConfig, generate
from mambakit.serving import Job, Metrics, Scheduler, SchedulerOptions
from mambakit.serving.scheduler import DRAW_WINDOW
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


def test_mixed_sampling_over_many_draw_windows_gets_generate_tokens():
    """Rows of different sampling options share the batch, join at different steps (their draw windows
    run out at different iterations) and move rows as others leave; each still gets generate's tokens."""
    model = tiny_model("mamba2")
    options = [dict(top_k=0, temperature=0.8, top_p=0.9), dict(top_k=1), dict(top_k=0, repetition_penalty=1.3),
               dict(top_k=5, temperature=1.2, min_p=0.05)]
    budgets = [2 * DRAW_WINDOW + 5, 7, DRAW_WINDOW + 1, 30, DRAW_WINDOW, DRAW_WINDOW - 1, 3 * DRAW_WINDOW]
    prompts = [torch.randint(0, 256, (torch.randint(1, 20, ()).item(),)).tolist() for _ in budgets]
    seeds = torch.randint(0, 2**40, (len(budgets),)).tolist()
    scheduler = Scheduler(model, SchedulerOptions(max_batch=3, max_seqlen=256), ByteTokenizer(), Metrics())
    done = threading.Semaphore(0)
    jobs = [Job(p, k, SamplingConfig(**options[i % len(options)]), seed, frozenset(), (),
                lambda token, finish: finish and done.release())
            for i, (p, k, seed) in enumerate(zip(prompts, budgets, seeds))]
    scheduler.start()
    try:
        scheduler.submit(jobs)  # three rows at a time: the others join as rows leave
        for _ in jobs:
            assert done.acquire(timeout=120)
    finally:
        scheduler.stop()
    for i, job in enumerate(jobs):
        out = generate(model, [prompts[i]], max_new_tokens=budgets[i], seed=seeds[i], eos_token_id=[],
                       **options[i % len(options)])[0]
        assert job.generated == out[len(prompts[i]):]


def test_a_failing_prefill_fails_its_jobs_and_the_batch_goes_on(monkeypatch):
    model = tiny_model("mamba2")
    scheduler = Scheduler(model, SchedulerOptions(max_batch=4, max_seqlen=64), ByteTokenizer(), Metrics())
    finishes = []
    done = threading.Semaphore(0)

    def deliver(token, finish):
        if finish:
            finishes.append(finish)
            done.release()

    real_join = scheduler._join

    def join(jobs):
        if any(len(job.prompt) == 13 for job in jobs):
            raise RuntimeError("out of memory (simulated)")
        real_join(jobs)

    monkeypatch.setattr(scheduler, "_join", join)
    sampling = SamplingConfig()
    scheduler.start()
    try:
        scheduler.submit([Job([1] * 13, 5, sampling, 0, frozenset(), (), deliver)])
        assert done.acquire(timeout=60)
        scheduler.submit([Job([2] * 4, 5, sampling, 0, frozenset(), (), deliver)])
        assert done.acquire(timeout=60)
        assert scheduler.accepting  # the failure did not take the scheduler down
    finally:
        scheduler.stop()
    assert finishes == ["error", "length"]
    assert list(scheduler.metrics.errors) == ["prefill: RuntimeError: out of memory (simulated)"]


def test_the_scheduler_thread_runs_the_model_with_its_threads():
    model = tiny_model("mamba2")
    seen = []
    forward = model.forward

    def counting_forward(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    model.forward = counting_forward
    here = torch.get_num_threads()
    wanted = 1 if here > 1 else 2
    scheduler = Scheduler(model, SchedulerOptions(max_batch=2, max_seqlen=64, threads=wanted), ByteTokenizer(),
                          Metrics())
    done = threading.Semaphore(0)
    scheduler.start()
    try:
        scheduler.submit([Job([1, 2, 3], 4, SamplingConfig(), 0, frozenset(), (),
                              lambda token, finish: finish and done.release())])
        assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
        torch.set_num_threads(here)
    assert seen and set(seen) == {wanted}


def test_threads_must_be_a_positive_int():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"threads: expected an int >= 1 or None, got {bad!r}"):
            SchedulerOptions(threads=bad)
