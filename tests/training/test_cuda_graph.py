"""Training steps replayed from CUDA graphs (`cuda_graph=True`) follow the eager trainer's trajectory,
with gradient accumulation, and save and resume as eager runs do."""
import pytest
import torch

from mambakit.training import Trainer
from mambakit.training import checkpoint as ckpt

from .conftest import assert_same_adam_trajectory, tiny_config


def test_cuda_graph_without_a_gpu_is_refused_by_name(corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the refusal needs a machine without CUDA")
    with pytest.raises(ValueError, match="^cuda_graph: "):
        Trainer(tiny_config(corpus, device=None, cuda_graph=True), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("arch, extra", [("mamba", {}), ("mamba2", {}), ("mamba2", dict(use_seq_idx=True)),
                                         ("hybrid", dict(attn_layer_idx=[1])), ("transformer", {})])
def test_graph_replayed_steps_follow_the_eager_trainer_cuda(arch, extra, corpus, tmp_path):
    steps = 6
    fields = dict(arch=arch, device="cuda", d_model=64, batch_size=4, micro_batch_size=2, max_tokens=4 * 32 * 12,
                  **extra)
    trainers, losses = {}, {}
    for graphed in (False, True):
        trainer = Trainer(tiny_config(corpus, cuda_graph=graphed, **fields), tmp_path / f"run-{graphed}", quiet=True)
        losses[graphed] = torch.stack([trainer.train_step()[0] for _ in range(steps)])
        trainers[graphed] = trainer
    assert trainers[True]._graphs is not None  # the later steps were replays
    assert torch.isfinite(losses[True]).all()
    assert ((losses[True] - losses[False]).abs() / losses[False].abs()).max() < 1e-3
    assert_same_adam_trajectory(trainers[True].model, trainers[False].model, lr=3e-3, steps=steps)
    # A checkpoint of the graph run resumes (eagerly first, then captured again) and trains on.
    folder = trainers[True].save()
    assert ckpt.checkpoint_problem(folder) is None
    trainers[True].close()
    resumed = Trainer.resume(tmp_path / "run-True", quiet=True)
    assert resumed.step == steps and resumed.config.cuda_graph
    assert torch.isfinite(torch.stack([resumed.train_step()[0] for _ in range(3)])).all()
    assert resumed._graphs is not None
    resumed.close()
