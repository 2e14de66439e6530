"""Task evaluation in chunks through the inference cache gives the logits, predictions and accuracy
of one forward over the whole sequence; training follows its schedule and clipping."""
import pytest
import torch

from mambakit.bench.common import rel_err
from mambakit.tasks import InductionHeads, SelectiveCopying
from mambakit.tasks.train import _scored_logits, accuracy, task_model, train_task

ARCHS = {
    "mamba": {"d_state": 4},
    "mamba2": {"d_state": 4, "headdim": 8},
    "hybrid": {"d_state": 4, "headdim": 8, "attn_heads": 2, "attn_layer_idx": [1]},
}


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_chunked_scored_logits_equal_whole(arch, fresh_seed):
    task = SelectiveCopying(vocab_size=10, num_copy=6)
    model = task_model(arch, task.vocab_size, d_model=16, n_layer=2, **ARCHS[arch]).eval()
    # 36 tokens in chunks of 7: the answers (30..35) straddle a chunk boundary and the last chunk is one token.
    inputs, targets = task.sample(3, 36, torch.Generator().manual_seed(fresh_seed))
    ref_logits, ref_answers = _scored_logits(model, inputs, targets)
    logits, answers = _scored_logits(model, inputs, targets, chunk_len=7)
    assert torch.equal(answers, ref_answers)
    assert rel_err(logits, ref_logits) < 1e-5
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))


@pytest.mark.parametrize("arch", ["mamba", "hybrid"])
def test_chunked_accuracy_equals_whole(arch):
    task = InductionHeads(vocab_size=8)
    model = task_model(arch, task.vocab_size, d_model=16, n_layer=2, **ARCHS[arch])
    whole = accuracy(model, task, seq_len=50, num_samples=24, batch_size=8)
    chunked = accuracy(model, task, seq_len=50, num_samples=24, batch_size=8, chunk_len=16)
    assert chunked == whole
    assert model.training  # accuracy restores the training mode


def test_chunk_len_must_be_positive():
    task = InductionHeads(vocab_size=8)
    model = task_model("mamba", task.vocab_size, d_model=16, n_layer=1, d_state=4)
    with pytest.raises(ValueError, match="chunk_len"):
        accuracy(model, task, seq_len=16, num_samples=2, chunk_len=0)


def _steps_seen(monkeypatch):
    """Record the learning rate and gradient norm each Adam step sees."""
    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append((self.param_groups[0]["lr"], torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    return seen


def test_train_task_warmup_cosine_and_clipping(monkeypatch):
    task = InductionHeads(vocab_size=8)
    model = task_model("mamba", task.vocab_size, d_model=16, n_layer=1, d_state=4)
    seen = _steps_seen(monkeypatch)
    records = train_task(model, task, seq_len=24, steps=10, batch_size=2, lr=1e-2, warmup_steps=4,
                         min_lr_ratio=0.1, grad_clip=1e-3, progress=False, log_interval=5)
    lrs = [lr for lr, _ in seen]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])  # linear warmup to the peak
    assert lrs[4] == pytest.approx(1e-2) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # then strictly down
    assert 1e-3 < lrs[-1] < 2e-3  # near lr x min_lr_ratio by the last step, never below it
    assert all(norm <= 1e-3 * (1 + 1e-5) for _, norm in seen)  # clipped far below any natural gradient norm
    assert [r["lr"] for r in records] == pytest.approx([lrs[4], lrs[9]])


def test_train_task_default_is_constant_and_unclipped(monkeypatch):
    task = InductionHeads(vocab_size=8)
    model = task_model("mamba", task.vocab_size, d_model=16, n_layer=1, d_state=4)
    seen = _steps_seen(monkeypatch)
    train_task(model, task, seq_len=24, steps=4, batch_size=2, lr=3e-3, progress=False)
    assert [lr for lr, _ in seen] == [3e-3] * 4
    assert min(norm for _, norm in seen) > 1e-3  # the clipping test's bound is far below the natural norm


def test_train_task_grad_clip_must_be_positive():
    task = InductionHeads(vocab_size=8)
    model = task_model("mamba", task.vocab_size, d_model=16, n_layer=1, d_state=4)
    with pytest.raises(ValueError, match="grad_clip"):
        train_task(model, task, seq_len=24, steps=1, grad_clip=0.0, progress=False)


def test_train_task_curriculum_trains_each_stage_at_its_length():
    task = InductionHeads(vocab_size=8)
    model = task_model("mamba", task.vocab_size, d_model=16, n_layer=1, d_state=4)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    records = train_task(model, task, seq_len=24, steps=7, batch_size=2, curriculum=[(8, 2, 5), (16, 3)],
                         progress=False, log_interval=1)
    assert seen == [(5, 8)] * 2 + [(2, 16)] * 3 + [(2, 24)] * 2  # a stage's own batch, else batch_size
    assert [(r["batch_size"], r["seq_len"]) for r in records] == seen


@pytest.mark.parametrize("curriculum, fragment", [
    ([(8, 3), (16, 2)], "leaving none"),  # the stages take all 5 steps
    ([(8, 0)], "stages of ints"),
    ([(8, True)], "stages of ints"),
    ([(8, 2, 0)], "stages of ints"),
    ([(8, 2, 1, 1)], "stages of ints"),
    ([8], "stages of ints"),
])
def test_train_task_refuses_a_bad_curriculum(curriculum, fragment):
    task = InductionHeads(vocab_size=8)
    model = task_model("mamba", task.vocab_size, d_model=16, n_layer=1, d_state=4)
    with pytest.raises(ValueError, match=f"curriculum: .*{fragment}"):
        train_task(model, task, seq_len=24, steps=5, curriculum=curriculum, progress=False)
