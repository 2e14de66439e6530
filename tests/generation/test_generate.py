import pytest
import torch

from mambakit.generation import generate, iterate_tokens

KINDS = ["mamba1", "mamba2", "hybrid"]


@torch.no_grad()
def greedy_reference(model, ids: torch.Tensor, steps: int, vocab: int, penalty: float = 1.0) -> torch.Tensor:
    """Greedy continuation by the full parallel forward over the whole sequence at every step,
    with the CTRL repetition penalty applied by hand."""
    seq = ids
    for _ in range(steps):
        logits = model(seq).logits[:, -1, :vocab].double()
        for b in range(seq.shape[0]):
            seen = torch.unique(seq[b])
            logits[b, seen] = torch.where(logits[b, seen] > 0, logits[b, seen] / penalty, logits[b, seen] * penalty)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt_len", [1, 19])  # shorter than the conv window; three SSD chunks of 8
def test_step_decoding_equals_the_parallel_forward(kind, prompt_len, make_model, vocab):
    model = make_model(kind).double()
    ids = torch.randint(0, vocab, (2, prompt_len))
    out = generate(model, ids, max_new_tokens=10, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy_reference(model, ids, 10, vocab))
    assert out.num_new_tokens.tolist() == [10, 10]
    parallel = model(out.sequences).logits[:, prompt_len - 1 : -1, :vocab].float().detach()
    scores = torch.stack(out.scores, dim=1)  # the official format: one (batch, vocab) tensor per step
    assert len(out.scores) == 10 and scores.shape == (2, 10, vocab)
    assert float((scores - parallel).norm() / parallel.norm()) < 1e-6


@pytest.mark.parametrize("kind", ["mamba2", "hybrid"])
def test_repetition_penalty_matches_a_hand_written_loop(kind, make_model, vocab):
    model = make_model(kind).double()
    ids = torch.randint(0, vocab, (2, 6))
    out = generate(model, ids, max_new_tokens=8, repetition_penalty=3.0)
    assert torch.equal(out, greedy_reference(model, ids, 8, vocab, penalty=3.0))


def test_prefill_is_one_parallel_forward(make_model, vocab):
    model = make_model("mamba2")
    shapes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(args[0].shape)), with_kwargs=True)
    generate(model, torch.randint(0, vocab, (3, 40)), max_new_tokens=4)
    assert shapes == [(3, 40), (3, 1), (3, 1), (3, 1)]
    shapes.clear()
    generate(model, [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]], max_new_tokens=2)
    assert sorted(shapes) == [(1, 5), (2, 3), (3, 1)]


def test_long_prompts_are_prefilled_in_pieces(make_model, vocab):
    model = make_model("hybrid")
    shapes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(args[0].shape)), with_kwargs=True)
    generate(model, torch.randint(0, vocab, (2, 21)), max_new_tokens=2, prefill_chunk=8)
    assert shapes == [(2, 8), (2, 8), (2, 5), (2, 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_equals_whole_prefill(kind, make_model, vocab):
    model = make_model(kind).double()
    # Pieces of 4: 23 tokens end with a piece of 3, 9 tokens with a one-token piece (a decode step).
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (23, 9, 23, 2)]
    seeds = torch.randint(0, 2**40, (len(prompts),)).tolist()
    options = dict(max_new_tokens=6, temperature=1.0, top_k=0, seed=seeds, output_scores=True, return_dict_in_generate=True)
    whole = generate(model, prompts, prefill_chunk=None, **options)
    chunked = generate(model, prompts, prefill_chunk=4, **options)
    assert chunked.sequences == whole.sequences
    chunked_scores, whole_scores = (torch.stack(o.scores, dim=1) for o in (chunked, whole))
    assert float((chunked_scores - whole_scores).norm() / whole_scores.norm()) < 1e-6  # scores are fp32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.3}])
def test_ragged_batch_equals_one_by_one(kind, sampling, make_model, vocab):
    model = make_model(kind).double()
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 17, 5, 1, 11)]
    seeds = torch.randint(0, 2**40, (len(prompts),)).tolist()
    batched = generate(model, prompts, max_new_tokens=9, seed=seeds, **sampling)
    alone = [generate(model, [p], max_new_tokens=9, seed=[s], **sampling)[0] for p, s in zip(prompts, seeds)]
    assert batched == alone
    assert [len(s) - len(p) for s, p in zip(batched, prompts)] == [9] * 5


def test_left_padding_with_attention_mask_equals_ragged_prompts(make_model, vocab):
    model = make_model("hybrid").double()
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (3, 8, 5)]
    padded = torch.full((3, 8), vocab - 1)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, 8 - len(p) :], mask[b, 8 - len(p) :] = torch.tensor(p), 1
    out = generate(model, padded, max_new_tokens=7, attention_mask=mask, temperature=1.0, top_k=0, seed=5)
    ragged = generate(model, prompts, max_new_tokens=7, temperature=1.0, top_k=0, seed=5)
    assert torch.equal(out[:, :8], padded)
    assert out[:, 8:].tolist() == [r[len(p) :] for r, p in zip(ragged, prompts, strict=True)]
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, padded, max_new_tokens=1, attention_mask=mask[:, 1:])


def test_int_seed_gives_row_b_seed_plus_b(make_model, vocab):
    model = make_model("mamba1")
    prompts = torch.randint(0, vocab, (3, 4))
    batched = generate(model, prompts, max_new_tokens=6, temperature=1.0, top_k=0, seed=100)
    for b in range(3):
        alone = generate(model, prompts[b : b + 1], max_new_tokens=6, temperature=1.0, top_k=0, seed=100 + b)
        assert torch.equal(batched[b : b + 1], alone)


def test_seeds_reproduce_and_differ(make_model, vocab):
    model = make_model("mamba2")
    ids = torch.randint(0, vocab, (2, 5))
    sample = lambda **kw: generate(model, ids, max_new_tokens=16, temperature=1.0, top_k=0, **kw)  # noqa: E731
    assert torch.equal(sample(seed=7), sample(seed=7))
    assert not torch.equal(sample(seed=7), sample(seed=8))
    torch.manual_seed(3)
    first = sample()
    torch.manual_seed(3)
    assert torch.equal(first, sample())


def test_finished_rows_stay_fixed(make_model, vocab):
    model = make_model("hybrid").double()
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (6, 3, 9)]
    free = generate(model, prompts, max_new_tokens=12)
    eos = free[0][6 + 2]  # row 0's third new token
    pad = vocab - 1
    out = generate(model, prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True)
    for b, (p, f) in enumerate(zip(prompts, free)):
        new = f[len(p):]
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert out.sequences[b] == f[: len(p) + stop]
        assert out.num_new_tokens[b] == stop
    assert out.num_new_tokens[0] <= 3

    same_length = torch.tensor([prompts[0][:3], prompts[1]])
    padded = generate(model, same_length, max_new_tokens=12, eos_token_id=[eos], pad_token_id=pad,
                      return_dict_in_generate=True)
    for b in range(2):
        n = int(padded.num_new_tokens[b])
        alone = generate(model, [same_length[b].tolist()], max_new_tokens=n)[0]
        assert torch.equal(padded.sequences[b, : 3 + n], torch.tensor(alone))
        assert bool((padded.sequences[b, 3 + n :] == pad).all())


def test_max_length_counts_the_prompt(make_model, vocab):
    model = make_model("mamba1")
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (2, 7, 10)]
    out = generate(model, prompts, max_length=10)
    assert [len(s) for s in out] == [10, 10, 10]
    assert generate(model, prompts, 10) == out  # the official positional spelling


class LetterTokenizer:
    """Token i is the single character chr(0x100 + i): every token is a whole, distinct character."""

    eos_token_id = None

    def decode(self, ids):
        return "".join(chr(0x100 + int(i)) for i in ids)


def test_stop_strings(make_model, vocab):
    model, tok = make_model("mamba2"), LetterTokenizer()
    prompt = torch.randint(0, vocab, (1, 5))
    free = generate(model, prompt, max_new_tokens=24)[0, 5:].tolist()
    stop = tok.decode(free[3:5])  # a string spanning two tokens
    expected = next(j + 1 for j in range(1, 24) if free[j - 1 : j + 1] == free[3:5])
    out = generate(model, prompt, max_new_tokens=24, stop_strings=["\0never", stop], tokenizer=tok, pad_token_id=0)
    out = out[0, 5:]
    assert out[:expected].tolist() == free[:expected]
    assert bool((out[expected:] == 0).all())

    # The tokenizer's end-of-text token stops a row unless eos_token_id says otherwise.
    tok.eos_token_id = free[2]
    stopped = generate(model, prompt, max_new_tokens=24, tokenizer=tok, return_dict_in_generate=True)
    assert stopped.num_new_tokens.item() == free.index(free[2]) + 1
    unstopped = generate(model, prompt, max_new_tokens=24, tokenizer=tok, eos_token_id=[])
    assert unstopped[0, 5:].tolist() == free


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=2, max_length=4), ValueError, "max_new_tokens"),
        (lambda m: generate(m, torch.tensor([[1, 2]])), ValueError, "max_new_tokens"),
        (lambda m: generate(m, torch.tensor([[1, 2]]), max_new_tokens=-1), ValueError, "max_new_tokens"),
        (lambda m: generate(m, torch.tensor([[1, 2, 3]]), max_length=2), ValueError, "max_length"),
        (lambda m: generate(m, torch.tensor([1, 2]), max_new_tokens=2), ValueError, "input_ids"),
        (lambda m: generate(m, torch.tensor([[1.0, 2.0]]), max_new_tokens=2), TypeError, "input_ids"),
        (lambda m: generate(m, "hello", max_new_tokens=2), TypeError, "input_ids"),
        (lambda m: generate(m, [[1, 2], []], max_new_tokens=2), ValueError, "empty"),
        (lambda m: generate(m, [[1, 300]], max_new_tokens=2), ValueError, "token ids"),
        (lambda m: generate(m, [[1, 2]], max_new_tokens=2, top_p=1.5), ValueError, "top_p"),
        (lambda m: generate(m, [[1, 2]], max_new_tokens=2, temperature=-0.5), ValueError, "temperature"),
        (lambda m: generate(m, [[1, 2]], max_new_tokens=2, stop_strings=["x"]), ValueError, "tokenizer"),
        (lambda m: generate(m, [[1, 2], [3]], max_new_tokens=2, seed=[1]), ValueError, "seed"),
        (lambda m: generate(m, [[1, 2]], max_new_tokens=2, eos_token_id=-3), ValueError, "eos_token_id"),
        (lambda m: generate(m, [[1, 2]], max_new_tokens=2, prefill_chunk=0), ValueError, "prefill_chunk"),
    ],
)
def test_bad_arguments_fail_clearly(call, error, match, make_model):
    with pytest.raises(error, match=match):
        call(make_model("mamba1"))


def test_zero_new_tokens_returns_the_prompts(make_model):
    model = make_model("mamba1")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


def test_nan_logits_raise(make_model):
    model = make_model("mamba1")
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        generate(model, [[1, 2, 3]], max_new_tokens=3)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_decoding_tracks_the_parallel_forward(kind, make_model, vocab):
    model = make_model(kind).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (2, 9))
    out = generate(model, ids, max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        parallel = model(out.sequences).logits[:, 8:-1, :vocab].float()
    scores = torch.stack(out.scores, dim=1)
    assert float((scores - parallel).norm() / parallel.norm()) < 1e-2


def test_iterated_steps_run_without_autograd(make_model, vocab):
    """The token iterator's steps run under no_grad (a decorator on the function that returns the generator
    would cover only its creation)."""
    model = make_model("mamba2")
    grad_modes = []
    model.lm_head.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    prompts = [torch.randint(0, vocab, (5,))]
    for _ in iterate_tokens(model, prompts, max_new_tokens=4, cg=False):
        pass
    assert len(grad_modes) >= 2 and not any(grad_modes)
