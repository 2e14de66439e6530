"""Hugging Face habits at the model boundary: `model(input_ids, labels=...)` returns the shifted causal-LM
loss, and a keyword no mixer takes is refused by the model, by name."""
import pytest
import torch

transformers = pytest.importorskip("transformers")


def loss_by_loop(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over (b, t) with labels[b, t + 1] != -100 of -log softmax(logits[b, t])[labels[b, t + 1]], in float64."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != -100:
                total -= torch.log_softmax(logits[b, t].double(), dim=-1)[target].item()
                count += 1
    return total / count


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "hybrid"])
def test_labels_give_the_shifted_cross_entropy(kind, tiny):
    model = tiny.build(kind)
    ids = tiny.random_ids(model, batch=3, seqlen=9)
    labels = ids.clone()
    labels[torch.rand(labels.shape) < 0.3] = -100
    labels[:, 1] = ids[:, 1]  # at least one target per row
    out = model(ids, labels=labels)
    assert out.logits is out[0] and out.loss.dtype == torch.float32
    assert abs(out.loss.item() - loss_by_loop(out.logits.detach(), labels)) < 1e-5
    out.loss.backward()
    assert model.backbone.embedding.weight.grad.abs().sum() > 0
    assert model(ids).loss is None


def test_the_loss_is_transformers_loss_on_the_same_checkpoint(tmp_path, tiny):
    model = tiny.build("mamba2")
    model.save_pretrained(tmp_path, format="hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tiny.random_ids(model, seqlen=11)
    with torch.no_grad():
        assert abs(model(ids, labels=ids).loss.item() - theirs(ids, labels=ids).loss.item()) < 1e-4


@pytest.mark.parametrize("labels, options, message", [
    (lambda ids: ids[:, :-1], {}, "labels: expected an int tensor of input_ids' shape"),
    (lambda ids: ids.float(), {}, "labels: expected an int tensor"),
    (lambda ids: ids.masked_fill(ids == ids[0, 3], 101), {}, r"labels: expected token ids in \[0, 101\)"),
    (lambda ids: torch.full_like(ids, -100), {}, "labels: expected at least one target"),
    (lambda ids: ids, {"num_last_tokens": 1}, "labels: the loss needs every position"),
])
def test_bad_labels_are_refused_by_name(labels, options, message, tiny):
    model = tiny.build("mamba1")
    ids = tiny.random_ids(model)
    with pytest.raises(ValueError, match=message):
        model(ids, labels=labels(ids), **options)


@pytest.mark.parametrize("kind, keyword", [("mamba1", "attention_mask"), ("mamba2", "use_cache"),
                                            ("hybrid", "seq_idx")])
def test_a_keyword_no_mixer_takes_is_refused_by_the_model(kind, keyword, tiny):
    model = tiny.build(kind)
    ids = tiny.random_ids(model)
    with pytest.raises(TypeError, match=f"MixerModel.forward: unknown keyword arguments \\['{keyword}'\\]"):
        model(ids, **{keyword: torch.ones_like(ids)})


def test_a_keyword_every_mixer_takes_still_reaches_them(tiny):
    model = tiny.build("mamba2")
    ids = tiny.random_ids(model, batch=1, seqlen=10)
    seq_idx = torch.tensor([[0] * 4 + [1] * 6], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx).logits
        second = model(ids[:, 4:]).logits
    assert tiny.rel_err(packed[:, 4:], second) < 1e-5  # the state resets where seq_idx changes


def test_padding_rows_of_the_vocabulary_are_refused_like_generate_refuses_them():
    from mambakit import MambaConfig, MambaLMHeadModel

    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=50, pad_vocab_size_multiple=8,
                                         ssm_cfg={"layer": "Mamba2", "headdim": 8, "d_state": 4}))
    assert model.lm_head.weight.shape[0] == 56  # padded
    ids = torch.randint(0, 50, (2, 6))
    model(ids)  # in range: fine
    ids[1, 3] = 53  # a padding row: the embedding has it, the vocabulary does not
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 50\).*got 53"):
        model(ids)
