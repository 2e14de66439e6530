"""CUDA-graph decoding gives exactly what eager decoding gives (GPU only)."""
import pytest
import torch

from mambakit.generation import generate
from mambakit.generation.decoder import _decoders

pytestmark = pytest.mark.gpu

SAMPLINGS = [{}, {"top_k": 0, "temperature": 0.8, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 1.2}]


def ragged_prompts(vocab: int, lengths=(5, 17, 9)) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "hybrid"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                               (torch.float16, torch.bfloat16)])
def test_graph_decoding_equals_eager_token_for_token(kind, sampling, dtype, state_dtype, make_model, vocab):
    model = make_model(kind).to("cuda", dtype)
    prompts = ragged_prompts(vocab)
    options = dict(max_new_tokens=40, seed=[11, 12, 13], return_dict_in_generate=True, output_scores=True,
                   state_dtype=state_dtype, **sampling)
    eager = generate(model, prompts, cg=False, **options)
    stop = eager.sequences[1][len(prompts[1]) + 4]  # a token row 1 produces: at least one row stops early
    eager = generate(model, prompts, cg=False, eos_token_id=stop, **options)
    graph = generate(model, prompts, cg=True, eos_token_id=stop, **options)
    assert graph.sequences == eager.sequences
    assert torch.equal(graph.num_new_tokens, eager.num_new_tokens)
    # cuBLAS may pick other kernels while capturing: logits agree to rounding, tokens exactly.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    errors = [float((g - e).norm() / e.norm()) for g, e in zip(graph.scores, eager.scores, strict=True)]
    assert max(errors) < tolerance, errors


def test_kept_graph_is_reused_and_rows_that_stop_do_not_recapture(make_model, vocab):
    model = make_model("mamba2").to("cuda", torch.float16)
    generate(model, ragged_prompts(vocab), max_new_tokens=30, top_k=0, seed=1)
    (decoder,) = _decoders[model].values()
    for seed in range(3):
        prompts = ragged_prompts(vocab, (8, 3, 12))
        graph = generate(model, prompts, max_new_tokens=30, top_k=0, seed=seed, eos_token_id=[1, 2, 3, 4, 5])
        assert graph == generate(model, prompts, max_new_tokens=30, top_k=0, seed=seed, eos_token_id=[1, 2, 3, 4, 5],
                                 cg=False)
    assert list(_decoders[model].values()) == [decoder]  # same shapes and options: one capture


def test_teacher_outputs_and_a_tensor_batch_under_graphs(make_model, vocab):
    model = make_model("hybrid").to("cuda", torch.float16)
    ids = torch.randint(0, vocab, (4, 10), device="cuda")
    teacher = torch.randint(0, vocab, (4, 16), device="cuda")
    options = dict(max_length=30, teacher_outputs=teacher, top_k=0, seed=5)
    assert torch.equal(generate(model, ids, cg=True, **options), generate(model, ids, cg=False, **options))


def test_a_new_weight_tensor_gets_a_new_graph(make_model, vocab):
    model = make_model("mamba1").to("cuda")
    prompts = ragged_prompts(vocab)
    before = generate(model, prompts, max_new_tokens=12)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().flip(0).contiguous())
    assert generate(model, prompts, max_new_tokens=12) == generate(model, prompts, max_new_tokens=12, cg=False)
    assert generate(model, prompts, max_new_tokens=12) != before
