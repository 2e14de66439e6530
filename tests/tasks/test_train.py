"""Task evaluation in chunks through the inference cache gives the logits, predictions and accuracy
of one forward over the whole sequence."""
import pytest
import torch

from mambakit.tasks import InductionHeads, SelectiveCopying
from mambakit.tasks.train import _scored_logits, accuracy, task_model

ARCHS = {
    "mamba": {"d_state": 4},
    "mamba2": {"d_state": 4, "headdim": 8},
    "hybrid": {"d_state": 4, "headdim": 8, "attn_heads": 2, "attn_layer_idx": [1]},
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


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
    assert relative_error(logits, ref_logits) < 1e-5
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
