"""The one-launch greedy choice (CUDA; the Triton interpreter here) against `DecodeBuffers.choose`'s torch
ops, over several steps: ties, rows that had stopped, stop ids, budgets, a padded vocabulary's row stride."""
import dataclasses

import pytest
import torch

from mambakit.generation.decoder import DecodeBuffers
from mambakit.generation.sampling import SamplingConfig

pytest.importorskip("triton")
from mambakit.generation import triton_greedy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def buffers(batch: int, steps: int, vocab: int, stop_ids: torch.Tensor) -> DecodeBuffers:
    out = DecodeBuffers.allocate(batch, steps, vocab, 4, torch.device(DEVICE), False, None)
    out.argmax_keys = triton_greedy.argmax_keys(batch, torch.device(DEVICE))  # as on CUDA
    prompts = [torch.zeros(3, dtype=torch.long)] * batch
    budgets = torch.randint(1, steps + 1, (batch,), device=DEVICE)
    budgets[0] = 0  # finished before its first step
    out.load(prompts, torch.arange(batch, device=DEVICE), budgets, stop_ids, 7, None)
    return out


def copy(b: DecodeBuffers) -> DecodeBuffers:
    return dataclasses.replace(b, **{f.name: getattr(b, f.name).clone() for f in dataclasses.fields(b)
                                     if getattr(b, f.name) is not None})


@pytest.mark.parametrize("vocab", [5, 3000, 6500])  # one slice; two, the last partial; four
def test_greedy_choose_equals_the_torch_ops(vocab):
    batch, steps = 7, 5
    stop_ids = torch.randint(0, vocab, (3,), device=DEVICE)
    ours = buffers(batch, steps, vocab, stop_ids)
    reference = copy(ours)
    for _ in range(steps):
        padded = torch.randn(batch, vocab + 3, device=DEVICE).round(decimals=1)  # ties are likely
        logits = padded[:, :vocab]
        logits[1] = 0.5  # ties for the largest: the first index wins, also across the kernel's blocks
        logits[3, [vocab - 1, vocab // 3]] = logits[3].max() + 1
        logits[2, stop_ids[0]] = logits[2].max() + 1  # row 2 stops on a stop id
        logits[4] = -torch.rand(vocab, device=DEVICE) - 1  # every value negative: the one nearest zero wins
        logits[5] = -logits[5].abs() - 1
        logits[5, vocab // 2], logits[5, vocab - 1] = -0.0, 0.0  # equal values: the first wins
        logits[6] = float("-inf")  # nothing but -inf: index 0, as torch.argmax
        triton_greedy.greedy_choose(logits, ours)
        ours.step.add_(1)
        reference.choose_with_torch_ops(logits, SamplingConfig())
        for field in ("tokens", "finished", "step", "sequence", "active", "finished_at", "nan"):
            assert torch.equal(getattr(ours, field), getattr(reference, field)), field
        assert torch.equal(ours.argmax_keys, triton_greedy.argmax_keys(batch, torch.device(DEVICE)))  # at rest
    assert ours.finished.all()  # every budget was spent


def test_nan_logits_set_the_flag():
    ours = buffers(3, 2, 40, torch.tensor([5], device=DEVICE))
    logits = torch.randn(3, 40, device=DEVICE)
    triton_greedy.greedy_choose(logits, ours)
    assert not ours.nan
    logits[2, 17] = float("nan")
    triton_greedy.greedy_choose(logits, ours)
    assert ours.nan
