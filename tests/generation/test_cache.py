import pytest
import torch

from mambakit.generation import InferenceCache, decode_step, prefill


def fill_random(cache: InferenceCache) -> None:
    for states in cache.key_value_memory_dict.values():
        for t in states:
            if t is not None:
                t.copy_(torch.randn_like(t, dtype=torch.float32))
    cache.lengths_per_sample.copy_(torch.randint(1, 50, cache.lengths_per_sample.shape))


def states(cache: InferenceCache) -> list[torch.Tensor]:
    return [t for ts in cache.key_value_memory_dict.values() for t in ts if t is not None] + [cache.lengths_per_sample]


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_ssm_cache_does_not_grow_with_generated_tokens(kind, make_model, vocab):
    model = make_model(kind)
    short = InferenceCache.allocate(model, 2, max_seqlen=16)
    long = InferenceCache.allocate(model, 2, max_seqlen=100_000)
    assert short.nbytes == long.nbytes > 0
    prefill(model, short, list(torch.randint(0, vocab, (2, 12))))
    before = [(t.data_ptr(), t.shape) for t in states(short)]
    tokens = torch.randint(0, vocab, (2,))
    for _ in range(40):
        tokens = decode_step(model, short, tokens).argmax(-1)
    assert short.nbytes == long.nbytes
    assert [(t.data_ptr(), t.shape) for t in states(short)] == before  # updated in place, never reallocated
    assert short.seqlen_offset == 12 + 40 and short.lengths_per_sample.tolist() == [52, 52]


def test_attention_cache_grows_with_max_seqlen_only(make_model):
    model = make_model("hybrid")
    assert InferenceCache.allocate(model, 1, 64).nbytes > InferenceCache.allocate(model, 1, 16).nbytes


def test_reorder_select_write_rows_reset(make_model):
    cache = InferenceCache.allocate(make_model("hybrid"), 4, max_seqlen=8)
    fill_random(cache)
    original = [t.clone() for t in states(cache)]
    order = [2, 2, 0, 3]
    cache.reorder(order)
    for t, o in zip(states(cache), original):
        assert torch.equal(t, o[order])

    picked = cache.select([3, 1])
    assert picked.max_batch_size == 2
    for t, o in zip(states(picked), states(cache)):
        assert torch.equal(t, o[[3, 1]])

    fill_random(picked)
    cache.write_rows([0, 2], picked)
    for t, p in zip(states(cache), states(picked)):
        assert torch.equal(t[[0, 2]], p)

    untouched = [t[1].clone() for t in states(cache)]
    cache.reset([0, 2, 3])
    for t, keep in zip(states(cache), untouched):
        assert not t[[0, 2, 3]].any() and torch.equal(t[1], keep)
    cache.seqlen_offset = 5
    cache.reset()
    assert cache.seqlen_offset == 0 and not any(t.any() for t in states(cache))


def test_bad_arguments(make_model):
    model = make_model("mamba1")
    cache = InferenceCache.allocate(model, 3, max_seqlen=8)
    with pytest.raises(ValueError, match="batch_size"):
        InferenceCache.allocate(model, 0, 8)
    with pytest.raises(ValueError, match="max_seqlen"):
        InferenceCache.allocate(model, 1, 2.5)
    with pytest.raises(IndexError, match="rows"):
        cache.select([0, 3])
    with pytest.raises(ValueError, match="indices"):
        cache.reorder([0, 1])
    with pytest.raises(ValueError, match="source"):
        cache.write_rows([0, 1], InferenceCache.allocate(model, 3, 8))
    with pytest.raises(ValueError, match="source"):
        cache.write_rows([0], InferenceCache.allocate(make_model("mamba1", n_layer=2), 1, 8))


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "hybrid"])
def test_half_ssm_states_and_zeros_like(kind, make_model):
    model = make_model(kind)
    full = InferenceCache.allocate(model, 3, max_seqlen=16)
    half = InferenceCache.allocate(model, 3, max_seqlen=16, ssm_dtype=torch.bfloat16)
    for layer, (ours, theirs) in enumerate(zip(half.key_value_memory_dict.values(),
                                               full.key_value_memory_dict.values(), strict=True)):
        ssm_layer = layer not in model.config.attn_layer_idx
        for i, (t, ref) in enumerate(zip(ours, theirs, strict=True)):
            if t is None:
                continue
            assert t.shape == ref.shape
            # (conv_state, ssm_state) per SSM layer: only the SSM state takes ssm_dtype
            assert t.dtype == (torch.bfloat16 if ssm_layer and i == 1 else ref.dtype)
    assert half.nbytes < full.nbytes
    fill_random(half)
    fresh = half.zeros_like(2)
    assert fresh.max_batch_size == 2 and fresh.seqlen_offset == 0
    for t, ref in zip(states(fresh), states(half), strict=True):
        assert t.shape == (2, *ref.shape[1:]) and t.dtype == ref.dtype and t.device == ref.device and not t.any()
    with pytest.raises(ValueError, match="ssm_dtype: expected one of float32, bfloat16, float16, float64"):
        InferenceCache.allocate(model, 1, 8, ssm_dtype=torch.int8)
