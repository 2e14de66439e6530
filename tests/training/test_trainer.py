"""The trainer on tiny models: resuming repeats an uninterrupted run exactly, checkpoints load with
from_pretrained, validation metrics are consistent."""
import json
import math

import pytest
import torch

from mambakit import MambaLMHeadModel
from mambakit.training import Trainer, lm_loss
from mambakit.training import checkpoint as ckpt

from .conftest import assert_same_adam_trajectory, tiny_config


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_repeats_the_uninterrupted_run_exactly(corpus, tmp_path):
    config = tiny_config(corpus)
    full = Trainer(config, tmp_path / "full", quiet=True)
    full.fit()

    part = Trainer(config, tmp_path / "part", quiet=True)
    for _ in range(2):
        part.train_step()
    part.save()
    resumed = Trainer.resume(tmp_path / "part", quiet=True)
    assert resumed.step == 2
    result = resumed.fit()

    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert result["step"] == 6 and sorted(got) == [3, 4, 5, 6]
    assert [got[s] for s in got] == [expected[s] for s in got]  # bitwise, not approximately
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_is_a_pretrained_folder(corpus, tmp_path):
    trainer = Trainer(tiny_config(corpus, max_tokens=4 * 32 * 3), tmp_path / "run", quiet=True)
    result = trainer.fit()
    folder = ckpt.latest_checkpoint(tmp_path / "run")
    assert folder.name == "checkpoint-00000003" and result["checkpoint"].endswith(folder.name)
    loaded = MambaLMHeadModel.from_pretrained(folder)
    ids = torch.randint(0, 257, (2, 20))
    torch.testing.assert_close(loaded(ids).logits, trainer.model(ids).logits, rtol=0, atol=0)
    out = loaded.generate(ids[:1, :5], max_new_tokens=4)
    assert out.shape == (1, 9)
    state = torch.load(folder / ckpt.STATE_FILE, weights_only=True)
    assert state["step"] == 3 and state["samples"] == 12 and "state" in state["optimizer"]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_validation_metrics_agree(corpus, tmp_path):
    result = Trainer(tiny_config(corpus, max_tokens=4 * 32 * 3), tmp_path / "run", quiet=True).fit()
    assert math.isclose(result["val_ppl"], math.exp(result["val_loss"]), rel_tol=1e-9)
    # Every byte token is one byte, and end-of-document tokens add loss but no bytes: bpb >= nats / ln 2.
    assert result["val_bpb"] >= result["val_loss"] / math.log(2) > 0


def test_a_new_run_refuses_a_folder_with_checkpoints(corpus, tmp_path):
    Trainer(tiny_config(corpus, max_tokens=4 * 32), tmp_path / "run", quiet=True).fit()
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(tiny_config(corpus), tmp_path / "run", quiet=True)


def test_global_batch_must_split_over_micro_batches(corpus, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(tiny_config(corpus, batch_size=4, micro_batch_size=3), tmp_path / "run", quiet=True)


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    big = Trainer(tiny_config(corpus, max_tokens=4 * 32 * 2), tmp_path / "big", quiet=True)
    small = Trainer(tiny_config(corpus, max_tokens=4 * 32 * 2, micro_batch_size=1), tmp_path / "small", quiet=True)
    assert small.grad_accum == 4
    for _ in range(2):
        loss_big, norm_big = big.train_step()
        loss_small, norm_small = small.train_step()
        torch.testing.assert_close(loss_small, loss_big, rtol=1e-5, atol=0)
        torch.testing.assert_close(norm_small, norm_big, rtol=1e-4, atol=0)  # Adam alone would hide a scale error
    assert_same_adam_trajectory(big.model, small.model, big.config.lr, steps=2)


def test_trained_bpe_tokenizer_travels_with_the_checkpoint(corpus, tmp_path):
    config = tiny_config(corpus, train_tokenizer=300, max_tokens=4 * 32 * 2, save_interval=1)
    trainer = Trainer(config, tmp_path / "run", quiet=True)
    result = trainer.fit()
    folder = ckpt.latest_checkpoint(tmp_path / "run")
    assert (folder / "tokenizer.json").is_file()
    from mambakit.tokenizer import load_tokenizer

    text = "state space selective scan"
    assert load_tokenizer(folder).encode(text) == trainer.tokenizer.encode(text)
    # BPE tokens hold more than a byte each: bits per byte is below nats per token / ln 2.
    assert 0 < result["val_bpb"] < result["val_loss"] / math.log(2)
    resumed = Trainer.resume(tmp_path / "run", quiet=True, max_tokens=4 * 32 * 3)
    assert resumed.tokenizer.vocab_size == trainer.tokenizer.vocab_size and resumed.step == 2


def test_document_boundaries_reach_the_model(corpus, tmp_path):
    trainer = Trainer(tiny_config(corpus, use_seq_idx=True, seq_len=256, batch_size=2), tmp_path / "run", quiet=True)
    inside = [int(s) for s in trainer.dataset.token_file.doc_starts[1:] if s % 256]
    batch = trainer.dataset.windows_batch([s // 256 for s in inside[:2]])  # rows where a new document begins
    assert batch.seq_idx[:, -1].tolist() == [1, 1]
    with torch.no_grad():
        with_boundaries = lm_loss(trainer.model, batch)
        batch.seq_idx = None
        without = lm_loss(trainer.model, batch)
    assert with_boundaries != without
    loss, _ = trainer.train_step()
    assert torch.isfinite(loss)
