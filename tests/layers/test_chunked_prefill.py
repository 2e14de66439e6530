"""Chunked prefill: a forward over several tokens with seqlen_offset > 0 continues from the cached
states, so a sequence fed in chunks of any sizes (one-token steps mixed in) gives the outputs and the
final cache states of one parallel forward over the whole sequence."""
import random
from functools import partial

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.generation import InferenceCache
from mambakit.layers import MHA, Mamba, Mamba2

MIXERS = {
    "mamba": partial(Mamba, 16, d_state=4, layer_idx=0),
    "mamba_conv2": partial(Mamba, 16, d_state=4, d_conv=2, layer_idx=0),
    "mamba2_groups_mlp": partial(Mamba2, 16, d_state=4, headdim=4, ngroups=2, d_ssm=16, chunk_size=4, layer_idx=0),
    "mamba2_no_norm": partial(Mamba2, 16, d_state=4, headdim=8, rmsnorm=False, D_has_hdim=True, chunk_size=4,
                              layer_idx=0),
    "mha_rotary_gqa": partial(MHA, 16, 4, num_heads_kv=2, rotary_emb_dim=2, causal=True, layer_idx=0),
    "mha_conv_mlp": partial(MHA, 16, 2, rotary_emb_dim=8, rotary_emb_interleaved=True, d_conv=3, mlp_dim=8,
                            causal=True, layer_idx=0),
}


def random_chunks(total: int) -> list[int]:
    """Random sizes summing to `total`, among them a 1 and a 6 (longer than the Mamba2 chunk_size above)."""
    sizes, left = [], total - 7
    while left > 0:
        sizes.append(min(left, random.choice([1, 1, 2, 3, 5, 9])))
        left -= sizes[-1]
    for required in (1, 6):
        sizes.insert(random.randrange(len(sizes) + 1), required)
    return sizes


def run_in_chunks(layer, x, params, sizes):
    """Feed x (batch, L, d) in pieces of `sizes`, advancing the offset as generation would."""
    outs, offset = [], 0
    for size in sizes:
        params.seqlen_offset = offset
        params.lengths_per_sample.fill_(offset)
        outs.append(layer(x[:, offset:offset + size], inference_params=params))
        offset += size
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", MIXERS)
@torch.no_grad()
def test_chunks_equal_one_parallel_forward(name, cache_params, rel):
    layer = MIXERS[name]()
    batch, length = 2, 23
    x = torch.randn(batch, length, 16)
    whole = cache_params(max_seqlen=length, max_batch_size=batch, lengths_per_sample=torch.zeros(batch).long())
    ref = layer(x, inference_params=whole)
    chunked = cache_params(max_seqlen=length, max_batch_size=batch, lengths_per_sample=torch.zeros(batch).long())
    out = run_in_chunks(layer, x, chunked, random_chunks(length))
    assert rel(out, ref) < 1e-5
    for got, want in zip(chunked.key_value_memory_dict[0], whole.key_value_memory_dict[0], strict=True):
        if want is not None:
            assert rel(got, want) < 1e-5


@pytest.mark.parametrize("name", ["mha_rotary_gqa", "mha_conv_mlp"])
@torch.no_grad()
def test_attention_rows_continue_at_their_own_lengths(name, cache_params, rel):
    """Rows prefilled to different lengths (lengths_per_sample) continue together with one chunk."""
    layer = MIXERS[name]()
    prompt_lengths, extra = [3, 6], 5
    rows = [torch.randn(1, n + extra, 16) for n in prompt_lengths]
    params = cache_params(max_seqlen=12, max_batch_size=2, lengths_per_sample=torch.tensor(prompt_lengths))
    params.key_value_memory_dict[0] = layer.allocate_inference_cache(2, 12)
    for b, (row, n) in enumerate(zip(rows, prompt_lengths)):
        # A one-row view of the batch cache: the prefill writes straight into row b.
        row_params = cache_params(max_seqlen=12, max_batch_size=1)
        row_params.key_value_memory_dict[0] = tuple(s if s is None else s[b:b + 1]
                                                    for s in params.key_value_memory_dict[0])
        layer(row[:, :n], inference_params=row_params)
    params.seqlen_offset = max(prompt_lengths)
    out = layer(torch.cat([row[:, n:] for row, n in zip(rows, prompt_lengths)]), inference_params=params)
    for b, (row, n) in enumerate(zip(rows, prompt_lengths)):
        assert rel(out[b], layer(row)[0, n:]) < 1e-5


@torch.no_grad()
def test_attention_chunk_past_the_cache_is_an_error(cache_params):
    layer = MIXERS["mha_rotary_gqa"]()
    params = cache_params(max_seqlen=6, max_batch_size=1)
    layer(torch.randn(1, 4, 16), inference_params=params)
    params.seqlen_offset = 4
    with pytest.raises(ValueError, match="max_seqlen 6"):
        layer(torch.randn(1, 3, 16), inference_params=params)


@torch.no_grad()
def test_packed_sequences_cannot_continue(cache_params):
    layer = MIXERS["mamba2_groups_mlp"]()
    params = cache_params(max_seqlen=8, max_batch_size=2)
    cu_seqlens = torch.tensor([0, 3, 8])
    layer(torch.randn(1, 8, 16), cu_seqlens=cu_seqlens, inference_params=params)
    params.seqlen_offset = 8
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(1, 4, 16), cu_seqlens=torch.tensor([0, 2, 4]), inference_params=params)


@torch.no_grad()
def test_hybrid_model_in_chunks(rel):
    config = MambaConfig(d_model=16, n_layer=4, vocab_size=37, pad_vocab_size_multiple=1,
                         ssm_cfg={"layer": "Mamba2", "d_state": 4, "headdim": 4, "chunk_size": 4},
                         attn_layer_idx=[1, 3], attn_cfg={"num_heads": 2, "rotary_emb_dim": 4, "causal": True})
    model = MambaLMHeadModel(config).eval()
    batch, length = 2, 21
    ids = torch.randint(0, 37, (batch, length))
    ref = model(ids).logits
    whole = InferenceCache.allocate(model, batch, length)
    model(ids, inference_params=whole)
    chunked = InferenceCache.allocate(model, batch, length)
    out = run_in_chunks(lambda t, inference_params: model(t, inference_params=inference_params).logits,
                        ids, chunked, random_chunks(length))
    assert rel(out, ref) < 1e-5
    for i, states in whole.key_value_memory_dict.items():
        for got, want in zip(chunked.key_value_memory_dict[i], states, strict=True):
            if want is not None:
                assert rel(got, want) < 1e-5
