"""Every mixer in bf16 (built with dtype=bfloat16, fp32 weights loaded): the parallel forward and
decoding stay within bf16 accuracy of the fp32 layer, and the fp32 parameters stay fp32."""
from functools import partial

import pytest
import torch

from mambakit.layers import MHA, Mamba, Mamba2

MIXERS = {
    "mamba": partial(Mamba, 32, d_state=8, layer_idx=0),
    "mamba2": partial(Mamba2, 32, d_state=8, headdim=8, chunk_size=8, layer_idx=0),
    "mha": partial(MHA, 32, 4, num_heads_kv=2, rotary_emb_dim=4, causal=True, layer_idx=0),
}
FP32_PARAMETERS = {"A_log", "D", "dt_bias"}


@pytest.mark.parametrize("name", MIXERS)
def test_bf16_layer_matches_fp32(name, cache_params, rel):
    fp32 = MIXERS[name]()
    bf16 = MIXERS[name](dtype=torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    for pname, p in bf16.named_parameters():
        assert p.dtype == (torch.float32 if pname in FP32_PARAMETERS else torch.bfloat16), pname
    x = torch.randn(2, 12, 32)
    ref = fp32(x)
    out = bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    params = cache_params(max_seqlen=12, max_batch_size=2)
    with torch.no_grad():
        outs = [bf16(x[:, :5].bfloat16(), inference_params=params)]
        for t in range(5, 12):
            params.seqlen_offset = t
            outs.append(bf16(x[:, t:t + 1].bfloat16(), inference_params=params))
    assert rel(torch.cat(outs, dim=1), ref) < 1e-2
