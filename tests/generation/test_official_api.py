"""Code written for `mamba_ssm`'s `generate` runs unchanged and means the same."""
import pytest
import torch

from mambakit.generation import InferenceParams, generate
from mambakit.utils.generation import InferenceParams as OfficialPathInferenceParams


def greedy_loop(model, ids: torch.Tensor, steps: int, vocab: int) -> torch.Tensor:
    """Greedy continuation by the parallel forward over the whole sequence at every step."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1, :vocab].argmax(-1, keepdim=True)], dim=1)
    return ids


class RecordingStreamer:
    """transformers' streamer protocol: put(prompt ids), put(tokens) per step, end()."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_the_official_call_with_its_defaults_is_greedy(kind, make_model, vocab):
    model = make_model(kind).double()
    ids = torch.randint(0, vocab, (2, 5))
    out = model.generate(ids, 5 + 7, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0, return_dict_in_generate=True,
                         output_scores=True, repetition_penalty=1.0, eos_token_id=None, teacher_outputs=None,
                         vocab_size=None, cg=True, enable_timing=False, streamer=None)
    assert torch.equal(out.sequences, greedy_loop(model, ids, 7, vocab))
    assert isinstance(out.scores, tuple) and len(out.scores) == 7
    assert all(s.shape == (2, vocab) for s in out.scores)
    # Temperature or top_p alone do not switch sampling on: only top_k != 1 does.
    assert torch.equal(model.generate(ids, 12, temperature=0.5, top_p=0.9), out.sequences)
    sampled = [model.generate(ids, 12, top_k=0, seed=s) for s in range(4)]
    assert any(not torch.equal(s, out.sequences) for s in sampled)


def test_teacher_outputs_force_the_tokens_they_cover(make_model, vocab):
    model = make_model("mamba2")
    ids = torch.randint(0, vocab, (2, 4))
    teacher = torch.randint(0, vocab, (2, 4 + 3))  # covers the first 3 generated positions
    out = generate(model, ids, max_length=4 + 6, teacher_outputs=teacher)
    assert torch.equal(out[:, 4:7], teacher[:, 4:7])
    # After the teacher runs out, decoding continues greedily from the forced prefix.
    assert torch.equal(out, greedy_loop(model, out[:, :7], 3, vocab))


def test_vocab_size_restricts_the_sampled_ids(make_model, vocab):
    model = make_model("mamba1")
    ids = torch.randint(0, vocab, (3, 4))
    out = generate(model, ids, max_new_tokens=12, top_k=0, seed=3, vocab_size=10)
    assert int(out[:, 4:].max()) < 10
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, ids, max_new_tokens=2, vocab_size=vocab + 1)


def test_streamer_gets_the_prompt_then_each_token(make_model, vocab):
    model = make_model("mamba2")
    ids = torch.randint(0, vocab, (1, 6))
    streamer = RecordingStreamer()
    out = generate(model, ids, max_new_tokens=5, streamer=streamer)
    assert streamer.ended and len(streamer.puts) == 1 + 5
    assert torch.equal(streamer.puts[0], ids)
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), out[:, 6:])


def test_enable_timing_prints_the_time(make_model, capsys):
    generate(make_model("mamba1"), torch.tensor([[1, 2, 3]]), max_new_tokens=2, enable_timing=True)
    assert "ms" in capsys.readouterr().out


def test_inference_params_under_the_official_names():
    assert InferenceParams is OfficialPathInferenceParams
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    assert params.seqlen_offset == 0 and params.key_value_memory_dict == {}


@pytest.mark.parametrize("kind", ["mamba1", "hybrid"])
def test_reading_stops_back_every_few_tokens_changes_nothing(kind, make_model, vocab):
    model = make_model(kind)
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (3, 7, 5)]
    options = dict(max_new_tokens=20, top_k=0, seed=9, return_dict_in_generate=True, output_scores=True)
    first = generate(model, prompts, check_every=1, **options)
    stop = first.sequences[0][len(prompts[0]) + 2]  # row 0 stops at its third token, others maybe later
    every_token = generate(model, prompts, check_every=1, eos_token_id=stop, **options)
    every_seven = generate(model, prompts, check_every=7, eos_token_id=stop, **options)
    assert every_seven.sequences == every_token.sequences
    assert torch.equal(every_seven.num_new_tokens, every_token.num_new_tokens)
    assert len(every_seven.scores) == len(every_token.scores) == int(every_token.num_new_tokens.max())


def test_official_decode_function(make_model, vocab):
    from mambakit.utils.generation import decode

    model = make_model("mamba1")
    ids = torch.randint(0, vocab, (2, 3))
    out = decode(ids, model, 9, output_scores=True)
    assert torch.equal(out.sequences, greedy_loop(model, ids, 6, vocab)) and len(out.scores) == 6
