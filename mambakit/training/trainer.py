"""The language-model trainer: one loop for Mamba, Mamba-2, hybrids and Transformer++, on one
process or many (torchrun: DDP, or FSDP2 with `fsdp=True`).

    trainer = Trainer(TrainConfig(arch="mamba2", max_tokens="20M"), "runs/m2")
    trainer.fit()                          # later: Trainer.resume("runs/m2").fit()

Step s of a run trains on global samples [s * batch_size, (s + 1) * batch_size) of the data order
(see mambakit.data.packed); with the checkpointed optimizer and RNG states this makes a resumed run
repeat an uninterrupted one exactly (bitwise on the CPU).
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mambakit.data import Batch, PackedDataset, build_token_file, rank_sample_offset, select_corpus, train_bpe_tokenizer
from mambakit.ops import linear_cross_entropy
from mambakit.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from mambakit.training import checkpoint as ckpt
from mambakit.training import graphs
from mambakit.training.config import TrainConfig
from mambakit.training.distributed import Dist, wrap_model
from mambakit.training.lock import RunLock
from mambakit.training.metrics import PLOT_FILE, MetricsLog, bits_per_byte, plot_losses
from mambakit.training.optim import CosineSchedule, build_optimizer


def lm_loss(model: torch.nn.Module, batch: Batch, fused: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of `batch`, computed in fp32. fused (a bare MambaLMHeadModel):
    backbone, then the chunked linear + cross-entropy (no fp32 logits of the whole batch); else the
    model's own forward, which DDP and FSDP need for their hooks."""
    kwargs = {} if batch.seq_idx is None else {"seq_idx": batch.seq_idx}
    if fused:
        hidden = model.backbone(batch.input_ids, **kwargs)
        return linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, batch.targets.flatten())
    logits = model(batch.input_ids, **kwargs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten())


def text_bytes(tokenizer: Tokenizer, targets: torch.Tensor) -> int:
    """UTF-8 bytes of text the target tokens (batch, seq_len) stand for (for bits per byte)."""
    if isinstance(tokenizer, ByteTokenizer):
        return int((targets < 256).sum())
    return sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in targets)


# Fields that fix what a run is (its data and order, its model): a resumed run keeps them.
RUN_DEFINING = ("data", "include", "exclude", "tokenizer", "train_tokenizer", "seq_len", "val_fraction", "use_seq_idx",
                "seed", "batch_size", "arch", "d_model", "n_layer", "d_state", "headdim", "expand", "ssm_options",
                "attn_layer_idx", "attn_heads", "d_intermediate")


class TrainingDiverged(FloatingPointError):
    """Training stopped because the loss or the weights became NaN or infinite."""


def _plain(field: str, value):
    """`value` of a TrainConfig field as compared on resume (data paths as Path spells them: 'corpus/' is 'corpus')."""
    return [str(Path(p)) for p in value] if field == "data" else value


def _all_finite(state: dict) -> bool:
    """Whether every floating-point tensor of a state dict is finite (one host sync)."""
    flags = [t.isfinite().all() for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class StopRequested:
    """Records SIGINT / SIGTERM while installed, so that the loop saves and exits between steps."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: signals stay with their owner
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def _record(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class LossWindow:
    """Training losses summed on the device since the last log line (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite losses
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.steps, self.start = torch.zeros((), device=self.device), 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.nonfinite_streak = torch.where(loss.isfinite(), 0, self.nonfinite_streak + 1)

    def take(self) -> tuple[int, float, torch.Tensor]:
        """(steps, seconds, mean loss) since the last take; starts a new window."""
        result = (self.steps, time.perf_counter() - self.start, self.loss_sum / max(1, self.steps))
        self._reset()
        return result


class Trainer:
    """Builds the data, model, optimizer and schedule of `config` and trains into `run_dir`."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, quiet: bool = False, _resume_from: Path | None = None):
        self.config, self.run_dir, self.quiet = config, Path(run_dir), quiet
        self.dist = Dist.setup(config.device)
        self.device = self.dist.device
        self.lock = RunLock(self.run_dir)
        self._lock_run_dir()
        try:
            self._build(_resume_from)
        except BaseException:
            self.lock.discard()
            raise

    def _lock_run_dir(self) -> None:
        """Hold the run folder's lock (rank 0) for as long as this trainer trains; every rank fails if it is taken."""
        taken = None
        if self.dist.is_main:
            try:
                self.lock.acquire()
            except FileExistsError as err:
                taken = err
        if self.dist.any(taken is not None):
            raise taken or FileExistsError(f"out: {self.run_dir} is in use by another run (see rank 0)")

    def _build(self, _resume_from: Path | None) -> None:
        from mambakit import MambaLMHeadModel

        config = self.config
        if _resume_from is None and ckpt.latest_checkpoint(self.run_dir) is not None:
            raise FileExistsError(f"out: {self.run_dir} already holds checkpoints; resume it (--resume) "
                                  "or choose another folder")
        self.micro_batch, self.grad_accum = self._batch_split()
        self.corpus = select_corpus(config.data, config.include, config.exclude)
        self.tokenizer = load_tokenizer(_resume_from) if _resume_from else self._prepare_tokenizer()
        self.dataset = self._prepare_dataset()

        torch.manual_seed(config.seed)  # every rank builds the same initial weights
        self.model_config = config.model_config(self.tokenizer.vocab_size)
        self.model = MambaLMHeadModel(self.model_config, device=self.device)
        if _resume_from is not None and not config.fsdp:
            self._load_weights(_resume_from)
        if config.compile:
            self.model.backbone.compile()  # in place: same module and state-dict keys, compiled forward
        self.wrapped = wrap_model(self.model, self.dist, config.fsdp)
        self.fused_loss = not self.dist.enabled  # DDP and FSDP need the model's own forward
        if _resume_from is not None and config.fsdp:
            self._load_weights(_resume_from)
        if config.cuda_graph and (self.device.type != "cuda" or self.dist.enabled):
            raise ValueError(f"cuda_graph: needs one process on a CUDA device, got {self.dist.world_size} process(es) "
                             f"on {self.device.type}")
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay, config.betas,
                                         capturable=config.cuda_graph)
        self._graphs, self._warm_steps = None, 0
        total = config.total_steps()
        self.schedule = CosineSchedule(config.lr, total, min(total, math.ceil(config.warmup_fraction * total)),
                                       config.min_lr_ratio)
        self.step, self.elapsed = 0, 0.0
        self.metrics = MetricsLog(self.run_dir, enabled=self.dist.is_main)
        if _resume_from is not None:
            self._load_trainer_state(_resume_from)
        elif self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.run_dir)
            self.metrics.truncate_after(0)  # records of an earlier attempt that saved no checkpoint

    @classmethod
    def resume(cls, run_dir: str | Path, quiet: bool = False, **overrides) -> "Trainer":
        """The trainer of `run_dir` at its latest checkpoint; `overrides` change config fields
        (e.g. max_tokens to train further, device, eval_interval)."""
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"resume: no run folder {run_dir}")
        latest = ckpt.resumable_checkpoint(run_dir, warn=tqdm.write)
        saved = TrainConfig.load(latest).to_dict()
        overrides = {k: v for k, v in overrides.items() if v is not None}
        changed = {k: v for k, v in overrides.items() if k in RUN_DEFINING and _plain(k, v) != _plain(k, saved[k])}
        if changed:
            name = next(iter(changed))
            raise ValueError(f"{name}: the run in {run_dir} was trained with {saved[name]!r} and resumes with it, got "
                             f"{changed[name]!r}; start a new run (--out) to change {', '.join(changed)}")
        saved["max_time"] = None  # a time limit is the invocation's own, not the run's
        return cls(TrainConfig.from_dict({**saved, **overrides}), run_dir, quiet=quiet, _resume_from=latest)

    # ---------------------------------------------------------------------------------------------
    # setup

    def _batch_split(self) -> tuple[int, int]:
        """(sequences per rank per forward, forwards per optimizer step) for the global batch."""
        cfg, world = self.config, self.dist.world_size
        micro = cfg.micro_batch_size or cfg.batch_size // world
        if micro < 1 or cfg.batch_size % (micro * world):
            raise ValueError(f"batch_size: the global batch {cfg.batch_size} must be a multiple of micro_batch_size "
                             f"({micro}) x world size ({world})")
        return micro, cfg.batch_size // (micro * world)

    def _prepare_tokenizer(self) -> Tokenizer:
        cfg = self.config
        if cfg.train_tokenizer <= 0:
            try:
                return load_tokenizer(cfg.tokenizer)
            except (ValueError, OSError):
                raise
            except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
                raise ValueError(f"tokenizer: {cfg.tokenizer} is not a Hugging Face tokenizer.json ({err})") from None
        if self.dist.is_main:
            self._say(f"training a {cfg.train_tokenizer}-token BPE tokenizer on the corpus")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            train_bpe_tokenizer(self.corpus.files, cfg.train_tokenizer).save(self.run_dir)
        self.dist.barrier()
        return load_tokenizer(self.run_dir)

    def _prepare_dataset(self) -> PackedDataset:
        files = self.corpus.files
        if self.dist.is_main:  # one process tokenizes; the others open its memory-mapped file
            bar = tqdm(total=len(files), desc="tokenizing", unit="file", disable=self.quiet, leave=False)
            build_token_file(files, self.tokenizer, progress=lambda done, total: bar.update(1))
            bar.close()
        self.dist.barrier()
        tokens = build_token_file(files, self.tokenizer)
        dataset = PackedDataset(tokens, self.config.seq_len, self.config.val_fraction, self.config.seed,
                                with_seq_idx=self.config.use_seq_idx)
        self._say(f"data: {self.corpus.describe()}, {dataset}")
        return dataset

    def _say(self, text: str) -> None:
        if self.dist.is_main and not self.quiet:
            tqdm.write(text)

    # ---------------------------------------------------------------------------------------------
    # training

    def _autocast(self):
        use = self.config.bf16 and self.device.type == "cuda"
        # Graph capture needs autocast's cache of bf16 weight copies off (they would be freed inside the graph).
        return (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not self.config.cuda_graph) if use
                else contextlib.nullcontext())

    def _gradient_sync(self, enabled: bool):
        """Context for one micro-batch's forward and backward; skips the gradient all-reduce when not
        `enabled` (all but the last micro-batch of an accumulated step)."""
        if not self.dist.enabled:
            return contextlib.nullcontext()
        if self.config.fsdp:
            self.wrapped.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if enabled else self.wrapped.no_sync()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the global batch of step `self.step`. Returns (mean loss, grad norm) on device."""
        cfg, d = self.config, self.dist
        self.schedule.apply(self.optimizer, self.step)
        first = self.step * cfg.batch_size
        batches = [self.dataset.train_batch(rank_sample_offset(first, micro, d.rank, d.world_size, self.micro_batch),
                                            self.micro_batch).to(self.device) for micro in range(self.grad_accum)]
        if self._graphs is not None:
            result = self._graphs.replay(batches)
        elif cfg.cuda_graph:
            result = graphs.warm_up(lambda: self._eager_step(batches))
            self._warm_steps += 1
            if self._warm_steps == graphs.WARMUP_STEPS:
                self._graphs = graphs.StepGraphs(lambda batch: self._micro_step(batch, True), self._optimizer_step,
                                                 batches[0], self.grad_accum)
        else:
            result = self._eager_step(batches)
        self.step += 1
        return result

    def _eager_step(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            total += self._micro_step(batch, i == len(batches) - 1)
        return total / len(batches), self._optimizer_step()

    def _micro_step(self, batch: Batch, sync_gradients: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients accumulated); returns its loss, detached."""
        with self._gradient_sync(sync_gradients):
            with self._autocast():
                loss = lm_loss(self.wrapped, batch, self.fused_loss)
            (loss / self.grad_accum).backward()
        return loss.detach()

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step and zero the gradients; returns the gradient norm before clipping."""
        # grad_clip 0 is no clipping; the norm is still computed for the log.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        # Under CUDA graphs the gradients stay allocated: the captured backward accumulates into them.
        self.optimizer.zero_grad(set_to_none=not self.config.cuda_graph)
        return grad_norm

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (nats/token), perplexity and bits per byte on the first eval_sequences validation windows."""
        cfg, d = self.config, self.dist
        limit = (min(len(self.dataset.val_windows), cfg.eval_sequences) // d.world_size) * d.world_size
        if limit == 0:
            return {}
        model = self.wrapped if cfg.fsdp else self.model  # FSDP ranks must all run the sharded forward
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss * tokens, tokens, bytes
        for batch in self.dataset.val_batches(self.micro_batch, limit, d.rank, d.world_size):
            with self._autocast():
                loss = lm_loss(model, batch.to(self.device), self.fused_loss)
            n = batch.targets.numel()
            sums += torch.tensor([float(loss) * n, n, text_bytes(self.tokenizer, batch.targets)],
                                 dtype=torch.float64, device=self.device)
        model.train()
        loss_sum, tokens, nbytes = d.sum(sums).tolist()
        val_loss = loss_sum / tokens
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_bpb": bits_per_byte(val_loss, int(tokens), int(nbytes))}

    def fit(self) -> dict:
        """Train to max_tokens (or until max_time, SIGINT or SIGTERM), evaluating, logging and saving as
        configured. Returns the last metrics (with `stopped`: "done", "time" or the signal's name).
        Raises TrainingDiverged, without saving, when the loss stays non-finite for nonfinite_patience steps."""
        try:
            return self._fit()
        finally:
            self.lock.release()

    def close(self) -> None:
        """Release the run folder and leave the process group (when this trainer joined it)."""
        self.lock.release()
        self.dist.teardown()

    def _fit(self) -> dict:
        cfg, total = self.config, self.config.total_steps()
        self._say(f"model: {self.model_config.n_layer} layers ({cfg.arch}), d_model {cfg.d_model}, "
                  f"{sum(p.numel() for p in self.model.parameters()):,} parameters; {total} steps of "
                  f"{cfg.batch_size} x {cfg.seq_len} tokens on {self.dist.world_size} x {self.device.type}")
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.quiet or not self.dist.is_main)
        self._last, self._window = {}, LossWindow(self.device)
        fit_start = time.perf_counter()  # max_time counts this call only, so a resumed run gets its own
        run_start = fit_start - self.elapsed
        stopped = None
        self.wrapped.train()
        with StopRequested() as stop:
            while self.step < total and stopped is None:
                loss, grad_norm = self.train_step()
                self._window.add(loss)
                self.elapsed = time.perf_counter() - run_start
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == total:
                    self._log_training(grad_norm, bar)
                    self._check_finite_loss(bar)
                if self.step % cfg.eval_interval == 0 or self.step == total:
                    self._eval_and_log()
                stopped = self._stop_reason(stop, time.perf_counter() - fit_start)
                if stopped is None and self.step % cfg.save_interval == 0:
                    self.save()
        bar.close()
        if stopped is not None:
            self._say(f"stopping at step {self.step} ({stopped}): saving a checkpoint")
            if self.step % cfg.eval_interval:
                self._eval_and_log()
        if not self._saved_at_current_step():
            self.save()
        return {**self._last, "step": self.step, "tokens": self.step * cfg.tokens_per_step(),
                "stopped": stopped or "done", "checkpoint": str(ckpt.checkpoint_dir(self.run_dir, self.step))}

    def _check_finite_loss(self, bar) -> None:
        """Raise TrainingDiverged once the loss has been non-finite for nonfinite_patience consecutive steps
        (read at log lines, which synchronize anyway)."""
        streak = int(self._window.nonfinite_streak)
        if self.dist.any(streak >= self.config.nonfinite_patience):
            bar.close()
            self._diverged(f"NaN or infinite for {streak} step{'s' * (streak > 1)} in a row")

    def _diverged(self, what: str) -> NoReturn:
        latest = ckpt.latest_checkpoint(self.run_dir)
        kept = f"the last finite checkpoint is {latest}" if latest else "no checkpoint was saved"
        raise TrainingDiverged(f"loss: {what} by step {self.step} (lr {self.config.lr:g}); stopped without "
                               f"saving; {kept} (a lower --lr or --grad-clip may help)")

    def _stop_reason(self, stop: StopRequested, seconds: float) -> str | None:
        """The signal's name or "time" when any rank must stop now, else None (agreed by all ranks)."""
        out_of_time = self.config.max_time is not None and seconds > self.config.max_time
        if not self.dist.any(stop.signum is not None or out_of_time):
            return None
        return signal.Signals(stop.signum).name if stop.signum is not None else "time"

    def _log_training(self, grad_norm: torch.Tensor, bar) -> None:
        steps, seconds, mean_loss = self._window.take()
        tokens_per_step = self.config.tokens_per_step()
        self._last = {"step": self.step, "tokens": self.step * tokens_per_step,
                      "loss": float(self.dist.mean(mean_loss)), "lr": self.schedule.lr(self.step - 1),
                      "grad_norm": float(grad_norm), "tok_per_s": steps * tokens_per_step / seconds,
                      "elapsed_s": self.elapsed}
        self.metrics.append(self._last)
        bar.set_postfix(loss=f"{self._last['loss']:.3f}", tok_s=f"{self._last['tok_per_s']:,.0f}")

    def _eval_and_log(self) -> None:
        result = self.evaluate()
        if not result:
            return
        self.metrics.append({"step": self.step, "tokens": self.step * self.config.tokens_per_step(), **result})
        self._last.update(result)
        self._say(f"step {self.step}: validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}, "
                  f"{result['val_bpb']:.4f} bits per byte")

    # ---------------------------------------------------------------------------------------------
    # checkpoints

    def _saved_at_current_step(self) -> bool:
        latest = ckpt.latest_checkpoint(self.run_dir)
        return latest is not None and latest == ckpt.checkpoint_dir(self.run_dir, self.step)

    def _full_state(self) -> tuple[dict, dict]:
        """(model state dict, optimizer state dict keyed by parameter names), whole, on the CPU."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.dist.enabled)
        model_state = get_model_state_dict(self.model, options=opts)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return model_state, optim_state

    def save(self) -> Path:
        """Write checkpoint `self.step` (all ranks call this; rank 0 writes); a model with a non-finite
        weight is never written (TrainingDiverged)."""
        model_state, optim_state = self._full_state()
        if self.dist.any(not _all_finite(model_state)):
            self._diverged("the weights became NaN or infinite")
        folder = ckpt.checkpoint_dir(self.run_dir, self.step)
        if self.dist.is_main:
            state = {"step": self.step, "samples": self.step * self.config.batch_size, "elapsed": self.elapsed,
                     "optimizer": optim_state, "rng": ckpt.rng_state(), "world_size": self.dist.world_size}
            write = lambda tmp: self._write_files(tmp, model_state, state)  # noqa: E731
            folder = ckpt.write_checkpoint(self.run_dir, self.step, write, self.config.keep_last)
            records = self.metrics.records()
            if records:
                title = f"{self.config.arch}, d_model {self.config.d_model}, {self.config.n_layer} layers"
                plot_losses(records, self.run_dir / PLOT_FILE, title=title)
        self.dist.barrier()
        return folder

    def _write_files(self, folder: Path, model_state: dict, trainer_state: dict) -> None:
        self._pretrained_view(model_state).save_pretrained(folder)
        self.tokenizer.save(folder)
        self.config.save(folder)
        ckpt.save_trainer_state(folder, trainer_state)

    def _pretrained_view(self, model_state: dict):
        """A module holding `model_state` that save_pretrained can write (the model itself unless sharded)."""
        if not (self.config.fsdp and self.dist.enabled):
            return self.model
        from mambakit import MambaLMHeadModel

        with torch.device("meta"):
            view = MambaLMHeadModel(self.model_config)
        view.load_state_dict(model_state, assign=True)
        view.tie_weights()
        return view

    def _load_weights(self, folder: Path) -> None:
        from mambakit.models.checkpoint import load_state_dict_checked, read_state_dict

        state = read_state_dict(folder)
        if not (self.config.fsdp and self.dist.enabled):
            load_state_dict_checked(self.model, state, source=str(folder))
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.model_config.tie_embeddings:
            state["lm_head.weight"] = state["backbone.embedding.weight"]
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def _load_trainer_state(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = ckpt.load_trainer_state(folder)
        optim_state = ckpt.portable_optimizer_state(state["optimizer"], self.optimizer.param_groups)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True))
        ckpt.set_rng_state(state["rng"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        if state["samples"] != self.step * self.config.batch_size:
            raise ValueError(f"batch_size: the checkpoint read {state['samples']} samples in {self.step} steps, "
                             f"which batch_size {self.config.batch_size} does not repeat; resume with its batch size")
        if self.dist.is_main:
            ckpt.remove_stale_temporaries(self.run_dir)
            self.metrics.truncate_after(self.step)
        self._say(f"resumed {self.run_dir} at step {self.step} ({folder.name})")
