import math

import pytest
import torch

from mambakit.generation.sampling import SamplingConfig, filtered_probs, row_seeds, sample, sample_with_draws, uniform


def kept_by_top_p(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p (a plain loop, float64)."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    return kept


def draws(logits_row: torch.Tensor, config: SamplingConfig, n: int, seed: int) -> torch.Tensor:
    """n samples from one row of logits, one seed per copy of the row."""
    logits = logits_row.expand(n, -1)
    seeds = torch.arange(seed, seed + n, dtype=torch.long)
    return sample(logits, config, seeds, 0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
        (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"), (dict(min_p=1.0), "min_p"), (dict(min_p=-0.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(temperature="hot"), "temperature"),
    ],
)
def test_invalid_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**kwargs)


def test_greedy_unless_top_k_is_not_one_as_in_mamba_ssm():
    logits = torch.randn(6, 50)
    seeds = torch.arange(6)
    # The official rule: top_k=1 (the default) is greedy whatever temperature / top_p / min_p say.
    greedy_configs = (SamplingConfig(), SamplingConfig(temperature=0.0, top_k=0, top_p=0.5),
                      SamplingConfig(top_k=1, temperature=2.0), SamplingConfig(temperature=0.7, top_p=0.9, min_p=0.1))
    for config in greedy_configs:
        assert config.greedy
        assert torch.equal(sample(logits, config, seeds, 3), logits.argmax(-1))
    for config in (SamplingConfig(top_k=0), SamplingConfig(top_k=None), SamplingConfig(top_k=5, top_p=0.9)):
        assert not config.greedy
    # Official defaults top_p=0.0 / min_p=0.0 filter nothing: top_k=0 alone samples the plain softmax.
    plain = SamplingConfig(top_k=0)
    assert torch.equal(filtered_probs(logits, plain), filtered_probs(logits, SamplingConfig(top_k=0, top_p=1.0)))
    assert torch.allclose(filtered_probs(logits, plain), torch.softmax(logits, dim=-1))


def test_samples_follow_the_tempered_softmax():
    logits = torch.randn(8) * 2
    n = 40000
    counts = torch.bincount(draws(logits, SamplingConfig(temperature=0.7, top_k=0), n, seed=12345), minlength=8).double()
    probs = torch.softmax(logits.double() / 0.7, dim=0)
    # Each frequency within 5 binomial standard deviations of its probability.
    assert torch.all((counts / n - probs).abs() <= 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-4)


def test_top_k_top_p_min_p_only_sample_allowed_tokens():
    logits = torch.randn(40) * 3
    probs = torch.softmax(logits.double(), dim=0)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    assert set(draws(logits, SamplingConfig(top_k=5), 4000, seed=1).tolist()) <= top5
    nucleus = kept_by_top_p(probs, 0.8)
    got = set(draws(logits, SamplingConfig(top_k=0, top_p=0.8), 4000, seed=2).tolist())
    assert got <= nucleus and int(logits.argmax()) in got
    min_p_kept = {i for i in range(40) if probs[i] >= 0.1 * probs.max()}
    assert set(draws(logits, SamplingConfig(top_k=0, min_p=0.1), 4000, seed=3).tolist()) <= min_p_kept


def test_top_p_renormalizes_over_the_nucleus():
    logits = torch.tensor([2.0, 1.5, 1.0, -1.0, -3.0])
    probs = torch.softmax(logits.double(), dim=0)
    kept = sorted(kept_by_top_p(probs, 0.75))
    n = 40000
    counts = torch.bincount(draws(logits, SamplingConfig(top_k=0, top_p=0.75), n, seed=7), minlength=5).double()
    expected = torch.zeros(5, dtype=torch.float64)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert torch.all((counts / n - expected).abs() <= 5 * torch.sqrt(expected * (1 - expected) / n) + 1e-4)


def test_repetition_penalty_follows_ctrl():
    logits = torch.randn(3, 20)
    seen = torch.rand(3, 20) < 0.5
    penalty = 1.7
    expected = logits.clone()
    for b in range(3):
        for v in range(20):
            if seen[b, v]:
                expected[b, v] = logits[b, v] / penalty if logits[b, v] > 0 else logits[b, v] * penalty
    got = sample(logits, SamplingConfig(repetition_penalty=penalty), torch.arange(3), 0, seen)
    assert torch.equal(got, expected.argmax(-1))
    with pytest.raises(ValueError, match="seen"):
        sample(logits, SamplingConfig(repetition_penalty=penalty), torch.arange(3), 0)


def test_uniform_is_deterministic_spread_and_independent_of_the_batch():
    seeds = torch.randint(0, 2**62, (5000,))
    u0 = uniform(seeds, 0)
    assert torch.equal(u0, uniform(seeds, 0))
    assert torch.equal(uniform(seeds[7:8], 0), u0[7:8])
    assert bool(((u0 >= 0) & (u0 < 1)).all())
    assert abs(float(u0.mean()) - 0.5) < 0.02 and abs(float(u0.var()) - 1 / 12) < 0.01
    u1 = uniform(seeds, 1)
    assert float((u0 == u1).double().mean()) < 1e-3
    # Neighbouring seeds (seed + row) and steps give unrelated draws.
    consecutive = uniform(torch.arange(5000), 0)
    assert abs(float(torch.corrcoef(torch.stack([consecutive[:-1], consecutive[1:]]))[0, 1])) < 0.05


def test_row_seeds():
    assert row_seeds(10, 3, torch.device("cpu")).tolist() == [10, 11, 12]
    assert row_seeds([5, 1], 2, torch.device("cpu")).tolist() == [5, 1]
    torch.manual_seed(0)
    a = row_seeds(None, 2, torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(a, row_seeds(None, 2, torch.device("cpu")))
    with pytest.raises(ValueError, match="seed"):
        row_seeds([1, 2], 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="seed"):
        row_seeds(-1, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="seed"):
        row_seeds(1.5, 1, torch.device("cpu"))
    assert math.isfinite(float(uniform(row_seeds(2**63 - 1, 1, torch.device("cpu")), 0)[0]))


def test_draws_of_many_steps_in_one_call_are_each_steps_draws():
    seeds = torch.randint(0, 2**63 - 1, (5,))
    steps = torch.randint(0, 2**40, (1,)) + torch.arange(7)
    table = uniform(seeds[:, None], steps[None, :])
    assert table.shape == (5, 7)
    for j, step in enumerate(steps):
        assert torch.equal(table[:, j], uniform(seeds, int(step)))


def test_sample_with_draws_given_is_sample():
    logits = torch.randn(6, 50) * 3
    seeds, step = torch.randint(0, 2**62, (6,)), torch.randint(0, 1000, (6,))
    for config in (SamplingConfig(top_k=0), SamplingConfig(top_k=7, temperature=0.7, top_p=0.9, min_p=0.02),
                   SamplingConfig(top_k=1)):
        draws = None if config.greedy else uniform(seeds, step)
        assert torch.equal(sample_with_draws(logits, config, draws), sample(logits, config, seeds, step))
    with pytest.raises(ValueError, match="draws"):
        sample_with_draws(logits, SamplingConfig(top_k=0), None)
