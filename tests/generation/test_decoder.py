"""A forward-only Decoder (sampling=None) over a view of a larger cache: what a scheduler that samples
rows itself builds, one per batch size, all sharing one cache."""
import dataclasses
import gc
import weakref

import pytest
import torch

from mambakit.generation import InferenceCache, decode_step, prefill, release_decoders
from mambakit.generation.decoder import Decoder


def first_rows(cache: InferenceCache, n: int) -> InferenceCache:
    return dataclasses.replace(cache, max_batch_size=n, seqlen_offset=1,
                               lengths_per_sample=cache.lengths_per_sample[:n])


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_forward_only_decoder_on_shared_rows_equals_decode_step(device, make_model, vocab):
    model = make_model("mamba2").to(device)
    prompts = [torch.randint(0, vocab, (n,), device=device) for n in (7, 3, 11)]
    shared = InferenceCache.allocate(model, 4, 64)
    # Captured before any row is live (a capture zeroes the cache it ran on).
    decoders = {b: Decoder(model, b, 64, 1, vocab, 1, None, None, None, graph=device == "cuda",
                           cache=first_rows(shared, b)) for b in (2, 4)}
    reference = InferenceCache.allocate(model, 3, 64)
    for cache in (shared, reference):
        part = InferenceCache.allocate(model, 3, 64)
        prefill(model, part, prompts)
        cache.write_rows([0, 1, 2], part)
        cache.seqlen_offset = 1
    tokens = torch.randint(0, vocab, (3,), device=device)
    for step in range(4):
        expected = decode_step(model, reference, tokens)[:, :vocab]
        decoder = decoders[4]
        decoder.buffers.tokens[:3] = tokens
        got = decoder.advance()[:3]
        assert got.shape == (3, vocab)
        assert float((got - expected).norm() / expected.norm()) < 1e-5
        assert int(decoder.buffers.step) == 0  # nothing sampled, nothing recorded
        tokens = expected.argmax(-1)
    # The steps advanced the shared cache itself: its rows hold the reference's states.
    for ours, ref in zip(shared.key_value_memory_dict[0], reference.key_value_memory_dict[0]):
        assert float((ours[:3] - ref).norm() / ref.norm()) < 1e-5


@pytest.fixture
def no_cycle_collector():
    """Objects then die by reference counting alone: what a reference cycle keeps alive stays alive."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_generate_frees_its_decode_state_without_the_cycle_collector(device, make_model, vocab, no_cycle_collector,
                                                                      monkeypatch):
    # A decoder in a reference cycle held its cache (all layers' states for the batch) until gc ran.
    allocate, made = InferenceCache.allocate.__func__, []

    def recorded(cls, *args, **kwargs):
        cache = allocate(cls, *args, **kwargs)
        made.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(InferenceCache, "allocate", classmethod(recorded))
    model = make_model("mamba2").to(device)
    ids = torch.randint(0, vocab, (3, 5), device=device)
    model.generate(ids, 5 + int(torch.randint(2, 9, ())), cg=device == "cuda")
    decoder = Decoder(model, 2, 16, 4, vocab, 1, None, None, None, graph=device == "cuda")
    decoder_alive = weakref.ref(decoder)
    del decoder
    assert decoder_alive() is None
    release_decoders(model)  # the graph decoders generate keeps for reuse
    assert len(made) >= 2 and all(cache() is None for cache in made)
    model_alive = weakref.ref(model)
    del model
    assert model_alive() is None
