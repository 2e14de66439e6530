import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mambakit.generation import TextStream, generate, log_likelihood, stream
from mambakit.tokenizer import ByteTokenizer, HFTokenizer

TEXT = "naïve café: 5€ for 😀 and 世界, ok? "


def byte_level_bpe() -> HFTokenizer:
    """A small byte-level BPE trained here: multi-byte characters end up split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["hello world, the naive cafe " * 50], trainer)
    return HFTokenizer.from_tokenizers(tok)


def pieces(tokenizer, ids) -> list[str]:
    stream_ = TextStream(tokenizer)
    out = [stream_.push(i) for i in ids]
    return out + [stream_.flush()]


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), byte_level_bpe()], ids=["byte", "bpe"])
def test_stream_emits_only_whole_characters(tokenizer):
    ids = tokenizer.encode(TEXT * 2)
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # some tokens are partial characters
    out = pieces(tokenizer, ids)
    assert "".join(out) == TEXT * 2
    assert not any("\ufffd" in p for p in out)


def test_stream_holds_a_split_character_until_complete():
    stream_ = TextStream(ByteTokenizer())
    euro = list("€".encode())
    assert [stream_.push(b) for b in euro] == ["", "", "€"]
    assert stream_.push(ord("a")) == "a"


def test_stream_of_random_bytes_equals_decoding_all_at_once():
    ids = torch.randint(0, 256, (300,)).tolist()
    assert "".join(pieces(ByteTokenizer(), ids)) == bytes(ids).decode("utf-8", errors="replace")


def test_model_stream_equals_generate(make_model):
    model, tok = make_model("mamba2"), ByteTokenizer()
    options = dict(max_new_tokens=20, temperature=1.0, top_k=50, seed=11)
    text = "".join(stream(model, "héllo", tokenizer=tok, **options))
    ids = tok.encode("héllo")
    new = generate(model, [ids], tokenizer=tok, **options)[0][len(ids):]
    assert text == tok.decode(new)
    assert "".join(model.stream("héllo", tok, **options)) == text
    with pytest.raises(ValueError, match="tokenizer"):
        next(stream(model, "hi", max_new_tokens=2))


def test_log_likelihood_is_the_normalized_teacher_forced_log_prob(make_model, vocab):
    model, tok = make_model("hybrid"), ByteTokenizer()
    scores = log_likelihood(model, "héllo wörld", tokenizer=tok)
    ids = torch.tensor(tok.encode("héllo wörld"))
    assert torch.equal(scores.token_ids, ids)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].double()
    assert logits.shape[-1] > vocab  # padded rows exist and must not take probability
    logits = logits[:, :vocab]
    expected = logits.log_softmax(-1).gather(-1, ids[1:, None]).squeeze(-1)
    assert float((scores.logprobs.double() - expected).norm() / expected.norm()) < 1e-5
    assert math.isclose(scores.perplexity, math.exp(-float(expected.mean())), rel_tol=1e-5)
    assert torch.equal(model.log_likelihood(ids.tolist()).logprobs, scores.logprobs)


@pytest.mark.parametrize(
    "text, kwargs, match",
    [([5], {}, "at least 2"), ("hi", {}, "tokenizer"), (torch.ones(2, 3, dtype=torch.long), {}, "shape"),
     ([1, 999], {}, "token ids"), (torch.tensor([1.0, 2.0]), {}, "text")],
)
def test_log_likelihood_bad_input(text, kwargs, match, make_model):
    with pytest.raises(ValueError, match=match):
        log_likelihood(make_model("mamba1"), text, **kwargs)


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), byte_level_bpe()], ids=["byte", "bpe"])
def test_stop_string_watch_agrees_with_decoding_the_whole_text(tokenizer):
    """StopStringWatch says at every token what generate()'s rule says (decode everything, search it), on
    multi-byte characters split across tokens and on invalid UTF-8 (random bytes), up to the first hit."""
    from mambakit.generation import StopStringWatch

    rng = __import__("random").Random(0)
    text_ids = tokenizer.encode(TEXT * 2)
    for trial in range(200):
        ids = text_ids if trial % 2 else [rng.randrange(256) for _ in range(60)]
        full = tokenizer.decode(ids)
        start = rng.randrange(len(full) - 3)
        stops = [full[start:start + rng.randint(1, 3)], "\ufffd" if trial % 5 == 0 else "never here"]
        watch = StopStringWatch(tokenizer, stops)
        for t in range(len(ids)):
            hit = any(s in tokenizer.decode(ids[:t + 1]) for s in stops)
            assert watch.push(ids[t]) == hit, (trial, t)
            if hit:
                break
