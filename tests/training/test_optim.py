"""Weight-decay grouping and the learning-rate schedule."""
import math

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.training import CosineSchedule, build_optimizer, param_groups

NO_DECAY_SUFFIXES = ("A_log", "D", "dt_bias", "norm.weight", "norm_f.weight", "bias")


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_no_weight_decay_on_ssm_parameters_norms_and_biases(layer):
    ssm_cfg = {"layer": layer, "d_state": 8} | ({"headdim": 16} if layer == "Mamba2" else {})
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=ssm_cfg))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = dict(model.named_parameters())
    for name in no_decay["param_names"]:
        assert name.endswith(NO_DECAY_SUFFIXES), name
    for name in decay["param_names"]:
        assert not name.endswith(NO_DECAY_SUFFIXES) and names[name].ndim >= 2, name
    assert any(n.endswith("A_log") for n in no_decay["param_names"])
    assert "backbone.embedding.weight" in decay["param_names"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_optimizer_applies_decay_only_to_its_group():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before_w, before_b = model.weight.detach().clone(), model.bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay can move a parameter
    opt.step()
    assert torch.allclose(model.weight, before_w * (1 - 0.1 * 0.5)) and torch.equal(model.bias, before_b)


def test_schedule_warms_up_then_decays_to_the_floor():
    s = CosineSchedule(peak_lr=1e-3, total_steps=100, warmup_steps=10, min_ratio=0.1)
    lrs = [s.lr(i) for i in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert min(lrs) == pytest.approx(1e-4) and lrs[100:] == [pytest.approx(1e-4)] * 20
    middle = 10 + 45  # halfway through the decay the cosine is at the midpoint of peak and floor
    assert lrs[middle] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))


def test_schedule_refuses_impossible_settings():
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineSchedule(1e-3, total_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="min_ratio"):
        CosineSchedule(1e-3, total_steps=10, min_ratio=2.0)


def test_schedule_fills_a_tensor_learning_rate_in_place():
    """A captured optimizer step (CUDA graphs) reads the learning rate from its tensor: the schedule must
    write into that tensor, not replace it; float learning rates are replaced."""
    model = torch.nn.Linear(3, 2)
    lr = torch.tensor(1.0)
    tensor_opt = torch.optim.AdamW(model.parameters(), lr=lr)
    float_opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    schedule = CosineSchedule(2e-3, total_steps=10, warmup_steps=4)
    step = int(torch.randint(0, 10, ()))
    schedule.apply(tensor_opt, step)
    schedule.apply(float_opt, step)
    assert tensor_opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(schedule.lr(step))
    assert float_opt.param_groups[0]["lr"] == schedule.lr(step)
