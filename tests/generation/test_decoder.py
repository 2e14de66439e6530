"""A forward-only Decoder (sampling=None) over a view of a larger cache: what a scheduler that samples
rows itself builds, one per batch size, all sharing one cache."""
import dataclasses

import pytest
import torch

from mambakit.generation import InferenceCache, decode_step, prefill
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
