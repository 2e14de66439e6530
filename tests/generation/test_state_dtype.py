"""generate(..., state_dtype=bf16 / fp16): SSM states kept in the half dtype, decode close to fp32 states."""
import pytest
import torch

from mambakit.generation import InferenceCache, decode_step, generate, prefill

KINDS = ["mamba1", "mamba2", "hybrid"]
# ||scores - fp32-state scores|| / ||fp32-state scores|| over 24 tokens of a 3-layer model, the same tokens fed
# to both (measured over 5 seeds: at most 1.0e-4 for bf16, 1.4e-5 for fp16)
TOLERANCE = {torch.bfloat16: 2e-3, torch.float16: 3e-4}


def ragged_prompts(vocab: int, lengths=(6, 19, 11)) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (n,)) for n in lengths]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prefill_chunk", [None, 4])  # whole prompts, or pieces continuing from the half states
def test_half_states_decode_close_to_fp32_states(kind, state_dtype, prefill_chunk, make_model, vocab):
    model = make_model(kind)
    prompts = ragged_prompts(vocab)
    options = dict(max_new_tokens=24, output_scores=True, return_dict_in_generate=True, prefill_chunk=prefill_chunk)
    ref = generate(model, prompts, **options)
    forced = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in ref.sequences], batch_first=True)
    got = generate(model, prompts, state_dtype=state_dtype, teacher_outputs=forced, **options)  # the same tokens
    scores, ref_scores = torch.stack(got.scores), torch.stack(ref.scores)
    assert ((scores - ref_scores).norm() / ref_scores.norm()).item() < TOLERANCE[state_dtype]
    if prefill_chunk is None:  # the prefill's logits do not read the cached states: the first token is the same
        assert torch.equal(scores[0], ref_scores[0])


@pytest.mark.parametrize("kind", KINDS)
def test_generate_decodes_on_states_of_the_dtype_asked(kind, make_model, vocab):
    """The same logits as prefill + decode_step on a cache allocated with bf16 SSM states."""
    model = make_model(kind)
    prompts = [p[:9] for p in ragged_prompts(vocab)]  # one length: one prefill group
    out = generate(model, prompts, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
                   state_dtype=torch.bfloat16)
    cache = InferenceCache.allocate(model, 3, 16, ssm_dtype=torch.bfloat16)
    with torch.no_grad():
        logits = prefill(model, cache, prompts)[:, :vocab]
        for step_scores in out.scores:
            assert torch.equal(step_scores, logits)
            logits = decode_step(model, cache, logits.argmax(-1))[:, :vocab]


def test_bad_state_dtype_names_the_argument(make_model):
    with pytest.raises(ValueError, match="state_dtype: expected one of float32, bfloat16, float16, float64, got"):
        generate(make_model("mamba2"), [[1, 2, 3]], max_new_tokens=2, state_dtype=torch.int8)
