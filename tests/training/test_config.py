"""TrainConfig refuses settings that would train something other than what was asked, naming the field."""
import pytest
import torch

from mambakit.training import TrainConfig
from mambakit.training.distributed import check_device


@pytest.mark.parametrize("fields, name", [
    (dict(keep_last=-1), "keep_last"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(grad_clip=float("nan")), "grad_clip"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=100, batch_size=4, seq_len=32), "max_tokens"),
    (dict(arch="transformer", d_model=32, attn_heads=5), "attn_heads"),
    (dict(arch="transformer", d_model=30, attn_heads=10), "attn_heads"),  # heads of 3: odd, no rotary
    (dict(arch="hybrid", attn_layer_idx=[8], n_layer=8), "attn_layer_idx"),
    (dict(device="gpu"), "device"),
    (dict(device="tpu"), "device"),
    (dict(device="mps"), "device"),
    (dict(device="cuda:x"), "device"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(warmup_fraction=-0.1), "warmup_fraction"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(d_state=0), "d_state"),
    (dict(max_time=0.0), "max_time"),
    (dict(nonfinite_patience=0), "nonfinite_patience"),
    (dict(seq_len=2.5), "seq_len"),
    (dict(cuda_graph=True, device="cpu"), "cuda_graph"),
    (dict(cuda_graph=True, compile=True), "cuda_graph"),
])
def test_bad_settings_are_refused_by_name(fields, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        TrainConfig(**fields)


def test_zero_means_off_where_documented():
    config = TrainConfig(grad_clip=0.0, keep_last=0)
    assert config.grad_clip == 0 and config.keep_last == 0
    assert TrainConfig(arch="transformer", d_model=30, attn_heads=5).model_config(256).attn_cfg["head_dim"] == 6
    assert TrainConfig(arch="mamba", d_model=33).model_config(vocab_size=256).d_model == 33  # no attention: any width


# quoted ids: a bare id "gpu" would count as the gpu marker in conftest.py and skip the case
@pytest.mark.parametrize("name", ["gpu", "tpu", "mps", "cuda:-1", "cuda:0,1", ""], ids=lambda name: f"{name!r}")
def test_device_names_are_checked(name):
    with pytest.raises(ValueError, match=r"^device: expected cpu, cuda or cuda:N"):
        check_device(name)


def test_a_missing_gpu_is_named():
    assert check_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert check_device(f"cuda:{n - 1}").index == n - 1
        with pytest.raises(ValueError, match=f"there are {n} GPUs"):
            check_device(f"cuda:{n}")
    else:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            check_device("cuda")
