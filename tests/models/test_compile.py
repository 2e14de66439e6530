"""torch.compile of a whole LM training step (forward, loss, backward) traces in one graph and matches
eager: on the CPU through each op path (the plain PyTorch one, and the Triton custom ops through the
interpreter: what a GPU compiles), and on CUDA with inductor and bf16 autocast at shapes whose strides
are those of issue 13 (views of in_proj's output, transposed)."""
import os

import pytest
import torch
import torch.nn.functional as F

from mambakit.models import MambaConfig, MambaLMHeadModel
from mambakit.models.lm import check_input_ids
from mambakit.ops._common import BACKEND_ENV, triton_available


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def lm_loss(model, ids):
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def loss_and_grads(step_model, model, ids):
    """The loss of one training step of `step_model` (`model` or its compiled wrapper) and every
    parameter's gradient (gradients reset first)."""
    model.zero_grad(set_to_none=True)
    loss = lm_loss(step_model, ids)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_compiled_matches_eager(model, ids, backend, tol):
    eager_loss, eager_grads = loss_and_grads(model, model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: a graph break is an error
    loss, grads = loss_and_grads(compiled, model, ids)
    assert rel_err(loss, eager_loss) < tol
    assert grads.keys() == eager_grads.keys()
    errors = {name: rel_err(grads[name], eager_grads[name]) for name in grads}
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "hybrid"])
def test_compiled_step_matches_eager_cpu(kind, tiny, monkeypatch):
    """The CPU default op paths (reference / CPU scan); aot_eager needs no C++ toolchain."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    model = tiny.build(kind).train()
    assert_compiled_matches_eager(model, tiny.random_ids(model, batch=2, seqlen=16), "aot_eager", 1e-5)


@pytest.mark.skipif(not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton custom ops run on CPU tensors only through TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_compiled_step_matches_eager_triton_ops(kind, tiny, monkeypatch):
    """The custom ops (their fake kernels, autograd registration) inside one compiled graph."""
    from mambakit.ops.selective_scan import triton_scan

    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setattr(triton_scan, "TILE_L", 16)  # short tiles and 4-channel backward programs: a quick
    monkeypatch.setattr(triton_scan, "BWD_BLOCK_D", 4)  # interpreter (block sizes change speed, not results)
    model = tiny.build(kind, d_model=16).train()  # 32 channels: few programs to interpret
    assert_compiled_matches_eager(model, tiny.random_ids(model, batch=1, seqlen=16), "aot_eager", 1e-5)


GPU_MODELS = {  # d_model 256: in_proj views with strides like issue 13's (seq 512: 2048 vs 1 there)
    "mamba1": dict(ssm_cfg={"layer": "Mamba1"}),
    "mamba2": dict(ssm_cfg={"layer": "Mamba2", "headdim": 64}),
    "hybrid": dict(ssm_cfg={"layer": "Mamba2", "headdim": 64}, attn_layer_idx=[1], d_intermediate=512,
                   attn_cfg={"num_heads": 4, "causal": True, "rotary_emb_dim": 32}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(GPU_MODELS))
def test_compiled_step_matches_eager_cuda_bf16(kind):
    """Inductor (it asserts the custom ops' output strides against their fakes) under bf16 autocast:
    compiled == eager within bf16 noise."""
    config = MambaConfig(d_model=256, n_layer=2, vocab_size=1000, rms_norm=True, fused_add_norm=True,
                         residual_in_fp32=True, **GPU_MODELS[kind])
    model = MambaLMHeadModel(config, device="cuda").train()
    ids = torch.randint(0, config.vocab_size, (2, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_compiled_matches_eager(model, ids, "inductor", 3e-2)


@pytest.mark.gpu
def test_input_ids_check_does_not_sync_on_cuda():
    """One forward per micro-batch: reading the id range back would stall the GPU every step."""
    ids = torch.randint(0, 100, (2, 64), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        check_input_ids(ids, 100)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------ the trainer: loss path and --compile
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_trainer_fused_loss_equals_the_logits_loss(kind, tiny):
    """The single-process trainer's loss (backbone + chunked linear cross-entropy) == the model's logits path."""
    from mambakit.data import Batch
    from mambakit.training.trainer import lm_loss

    model = tiny.build(kind).train()
    ids = tiny.random_ids(model, batch=3, seqlen=17)
    batch = Batch(ids[:, :-1], ids[:, 1:])
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch, fused)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (want_loss, want_grads) = results
    assert rel_err(loss, want_loss) < 1e-5
    assert max(rel_err(g, w) for g, w in zip(grads, want_grads)) < 1e-5


def test_compile_with_fsdp_is_refused():
    from mambakit.training import TrainConfig

    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile=True, fsdp=True)


def test_compile_flag_reaches_the_config():
    from mambakit.cli import build_parser
    from mambakit.cli.train import given_options

    args = build_parser().parse_args(["train", "--out", "run", "--compile"])
    assert given_options(args)["compile"] is True
    assert "compile" not in given_options(build_parser().parse_args(["train", "--out", "run"]))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_compiled_trainer_steps_match_eager_cuda(arch, tmp_path, monkeypatch):
    """`mambakit train --compile`: the same first steps (bf16 autocast) as the eager trainer."""
    from mambakit.training import TrainConfig, Trainer

    monkeypatch.setenv("MAMBAKIT_CACHE", str(tmp_path / "cache"))  # token files stay in the test's folder
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(str(i % 97) for i in range(20000)))
    losses = {}
    for compiled in (False, True):
        config = TrainConfig(data=[str(tmp_path / "corpus")], arch=arch, d_model=256, n_layer=2, seq_len=512,
                             batch_size=2, max_tokens=2 * 512 * 3, device="cuda", compile=compiled,
                             eval_interval=100, save_interval=100, val_fraction=0.1)
        trainer = Trainer(config, tmp_path / f"run-{compiled}", quiet=True)
        losses[compiled] = torch.stack([trainer.train_step()[0] for _ in range(3)])
    assert torch.isfinite(losses[True]).all()
    assert rel_err(losses[True], losses[False]) < 2e-2
