"""Synthetic tasks: the scored answers are determined by the inputs (checked by plain loops)."""
import pytest
import torch

from mambakit.tasks import IGNORE, AssociativeRecall, InductionHeads, SelectiveCopying


@pytest.fixture
def generator(fresh_seed):
    return torch.Generator().manual_seed(fresh_seed)


def test_induction_heads_answer_follows_the_first_trigger(generator):
    task = InductionHeads(vocab_size=16)
    inputs, targets = task.sample(32, 100, generator)
    assert inputs.shape == targets.shape == (32, 100)
    for row, tgt in zip(inputs.tolist(), targets.tolist()):
        assert row.count(0) == 2 and row[-1] == 0
        first = row.index(0)
        assert tgt[:-1] == [IGNORE] * 99 and tgt[-1] == row[first + 1] != 0


def test_selective_copying_answers_are_the_data_tokens_in_order(generator):
    task = SelectiveCopying(vocab_size=10, num_copy=6)
    inputs, targets = task.sample(16, 64, generator)
    for row, tgt in zip(inputs.tolist(), targets.tolist()):
        context, markers = row[:58], row[58:]
        data = [t for t in context if t != 0]
        assert markers == [9] * 6 and len(data) == 6 and all(1 <= t <= 8 for t in data)
        assert tgt[:58] == [IGNORE] * 58 and tgt[58:] == data


def test_associative_recall_answers_are_the_stored_values(generator):
    task = AssociativeRecall(vocab_size=64)
    inputs, targets = task.sample(8, 48, generator)
    pairs = 12
    for row, tgt in zip(inputs.tolist(), targets.tolist()):
        store = dict(zip(row[0: 2 * pairs: 2], row[1: 2 * pairs: 2]))
        assert len(store) == pairs and all(1 <= k < 32 <= v < 64 for k, v in store.items())
        scored = [(i, t) for i, t in enumerate(tgt) if t != IGNORE]
        assert len(scored) == pairs and all(i >= 2 * pairs for i, _ in scored)
        assert sorted(row[i] for i, _ in scored) == sorted(store)
        assert all(store[row[i]] == t for i, t in scored)


@pytest.mark.parametrize("task", [InductionHeads(), SelectiveCopying(), AssociativeRecall(vocab_size=256)])
def test_samples_are_reproducible_from_the_seed(task, fresh_seed):
    draw = lambda seed: task.sample(4, 128, torch.Generator().manual_seed(seed))  # noqa: E731
    (a, ta), (b, tb), (c, _) = draw(fresh_seed), draw(fresh_seed), draw(fresh_seed + 1)
    assert torch.equal(a, b) and torch.equal(ta, tb) and not torch.equal(a, c)


def test_sizes_that_cannot_hold_the_task_are_refused(generator):
    with pytest.raises(ValueError, match="seq_len"):
        SelectiveCopying(num_copy=16).sample(1, 20, generator)
    with pytest.raises(ValueError, match="pairs"):
        AssociativeRecall(vocab_size=64, num_pairs=40).sample(1, 64, generator)
