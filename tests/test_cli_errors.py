"""Bad command lines end as one line on stderr and a non-zero exit, never a traceback, and change nothing.

Most cases run in-process through `mambakit.cli.main` (fast); a few run `python -m mambakit` to check
what a shell sees: the exit status, --debug's traceback, Ctrl-C.
"""
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mambakit.cli import main
from mambakit.training import checkpoint as ckpt
from mambakit.training.lock import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = ("--data {corpus} --d-model 32 --n-layer 2 --d-state 8 --headdim 16 --seq-len 32 --batch-size 4 "
        "--max-tokens 512 --log-interval 1 --device cpu --quiet")


def new_run(options: str) -> str:
    """A tiny `train --out <new folder>` with `options` last (so that they win over TINY's)."""
    return f"train --out {{new}} {TINY} {options}"


# (command line, exit status, a fragment the one line must hold: the argument it is about)
CASES = [
    # train: values that would train something else than asked, or lose checkpoints
    ("train", 2, "--out"),
    (new_run("--keep-last -1 --save-interval 2"), 2, "keep_last"),
    (new_run("--grad-clip -1"), 2, "grad_clip"),
    (new_run("--device gpu"), 2, "device"),
    (new_run("--device tpu"), 2, "device"),
    (new_run("--device mps"), 2, "device"),
    (new_run("--device cuda:99"), 2, "device"),
    (new_run("--max-tokens 0"), 2, "max_tokens"),
    (new_run("--max-tokens lots"), 2, "--max-tokens"),
    (new_run("--arch transformer --attn-heads 5"), 2, "attn_heads"),
    (new_run("--arch hybrid"), 2, "attn_layer_idx"),
    (new_run("--arch hybrid --attn-layer-idx 5"), 2, "attn_layer_idx"),
    (new_run("--arch hybrid --attn-layer-idx 1,x"), 2, "--attn-layer-idx"),
    (new_run("--arch rnn"), 2, "--arch"),
    (new_run("--arch transformer --seq-idx"), 2, "use_seq_idx"),
    (new_run("--lr 0"), 2, "lr"),
    (new_run("--lr nan"), 2, "lr"),
    (new_run("--val-fraction 2"), 2, "val_fraction"),
    (new_run("--warmup-fraction 1.5"), 2, "warmup_fraction"),
    (new_run("--weight-decay -1"), 2, "weight_decay"),
    (new_run("--batch-size 0"), 2, "batch_size"),
    (new_run("--micro-batch-size 3"), 2, "batch_size"),
    (new_run("--seq-len -1"), 2, "seq_len"),
    (new_run("--d-model 0"), 2, "d_model"),
    (new_run("--n-layer two"), 2, "--n-layer"),
    (new_run("--eval-sequences -1"), 2, "eval_sequences"),
    (new_run("--save-interval 0"), 2, "save_interval"),
    (new_run("--max-time -5"), 2, "max_time"),
    (new_run("--cuda-graph"), 2, "cuda_graph"),
    (new_run("--nonfinite-patience 0"), 2, "nonfinite_patience"),
    (new_run("--train-tokenizer 5"), 2, "train_tokenizer"),
    (new_run("--tokenizer {file}"), 2, "tokenizer"),
    (new_run("--tokenizer {missing}"), 2, "tokenizer"),
    (new_run("--ssm-options [1]"), 2, "--ssm-options"),
    (new_run("--ssm-options {{bad"), 2, "--ssm-options"),
    (new_run("--ssm-options " + shlex.quote('{{"nope": 1}}')), 2, "nope"),
    ("train --out {new} --data {missing} --quiet", 2, "data"),
    ("train --out {new} --data {empty} --quiet", 2, "data: no text files"),
    ("train --out {new} --data {binary} --quiet", 2, "data"),
    # train: folders that are not (or not only) a new run's
    ("train --out {run} " + TINY, 2, "already holds checkpoints"),
    ("train --out {file} " + TINY, 2, "out"),
    ("train --out /proc/mambakit-run " + TINY, 2, "out"),
    ("train --resume {missing}", 2, "resume"),
    ("train --resume {empty}", 2, "resume"),
    ("train --resume {run} --seq-len 64 --quiet", 2, "seq_len"),
    ("train --resume {run} --data {empty} --quiet", 2, "data"),
    ("train --resume {run} --d-model 64 --quiet", 2, "d_model"),
    # demo: checked before its minutes of training, and never deleting what it did not create
    ("demo --out {run}", 2, "--overwrite"),
    ("demo --out {file}", 2, "out"),
    ("demo --device gpu", 2, "device"),
    ("demo --keep-last -1", 2, "keep_last"),
    ("demo --new-tokens 0", 2, "new-tokens"),
    ("demo --prompt ''", 2, "prompt"),
    ("demo --max-tokens 0", 2, "max_tokens"),
    # synth: every argument checked before any training
    ("synth nosuch", 2, "task"),
    ("synth induction-heads --arch mamba,rnn", 2, "arch"),
    ("synth induction-heads --arch hybrid", 2, "attn_layer_idx"),
    ("synth induction-heads --arch mamba,mamba2 --ssm-options " + shlex.quote('{{"dt_scale": 2}}'), 2, "dt_scale"),
    ("synth induction-heads --eval-lens 64,x", 2, "--eval-lens"),
    ("synth induction-heads --eval-lens 0", 2, "--eval-lens"),
    ("synth induction-heads --eval-lens ...,64", 2, "--eval-lens"),
    ("synth induction-heads --eval-samples 0", 2, "eval-samples"),
    ("synth induction-heads --steps 0", 2, "steps"),
    ("synth induction-heads --batch-size 0", 2, "batch-size"),
    ("synth induction-heads --device tpu", 2, "device"),
    ("synth induction-heads --train-len 2", 2, "seq_len"),
    ("synth selective-copying --train-len 20", 2, "seq_len"),
    ("synth mqar --eval-lens 3", 2, "mqar"),
    ("synth induction-heads --vocab 1", 2, "vocab_size"),
    ("synth induction-heads --num-pairs 4", 2, "num-pairs"),
    ("synth mqar --num-pairs 0", 2, "num_pairs"),
    ("synth mqar --train-len 64 --num-pairs 40", 2, "40 pairs"),
    ("synth induction-heads --lr -1", 2, "lr"),
    ("synth induction-heads --grad-clip -1", 2, "grad-clip"),
    ("synth induction-heads --min-lr-ratio 2", 2, "min-lr-ratio"),
    ("synth induction-heads --max-time 0", 2, "max-time"),
    ("synth induction-heads --curriculum 64", 2, "--curriculum"),
    ("synth induction-heads --curriculum 64:0", 2, "--curriculum"),
    ("synth induction-heads --steps 2000 --curriculum 64:1500,128:500", 2, "curriculum"),  # no step left
    ("synth selective-copying --curriculum 20:5", 2, "seq_len"),
    ("synth induction-heads --eval-chunk -5", 2, "--eval-chunk"),
    ("synth induction-heads --out {file}", 2, "out"),
    ("synth induction-heads --out /proc/mambakit-synth", 2, "out"),
    # the loading commands, through the same handler
    ("generate --model {run}/latest --prompt ab --stop ''", 2, "stop_strings"),
    ("generate --model {run}/latest --prompt ab --seed -1", 2, "seed"),
    ("generate --model {run}/latest --prompt ab --max-new-tokens -1", 2, "--max-new-tokens"),
    ("generate --model {run}/latest --prompt-file {empty}", 2, "Is a directory"),
    ("generate --model {missing} --prompt ab", 2, "no such checkpoint"),
    ("generate --model {run}/latest --prompt ab --device tpu", 2, "device: expected cpu, cuda or cuda:N"),
    ("generate --model {run}/latest --prompt ab --tokenizer {run}/train_config.json", 2, "not a readable tokenizer"),
    ("score --model {missing} --text-file {file}", 2, "no such checkpoint"),
    ("score --model {run}/latest --text-file {missing}", 2, "No such file"),
    ("convert {missing} {new} --to hf", 2, "no such checkpoint"),
    # the command itself
    ("", 2, "COMMAND"),
    ("nosuch", 2, "nosuch"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Paths the command lines name: a corpus, a finished run, an empty folder, a binary file, a plain file."""
    root = tmp_path_factory.mktemp("cli")
    os.environ["MAMBAKIT_CACHE"] = str(root / "cache")  # restored below; module scope has no monkeypatch
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 13}" for j in range(400)))
    (root / "empty").mkdir()
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "plain.txt").write_text("not a tokenizer, not a folder\n")
    paths = {"corpus": corpus, "run": root / "run", "empty": root / "empty", "binary": root / "binary.bin",
             "file": root / "plain.txt", "missing": root / "missing"}
    assert main(shlex.split(("train --out {run} " + TINY).format(**paths))) == 0
    yield {**paths, "root": root}
    del os.environ["MAMBAKIT_CACHE"]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


def snapshot(root: Path) -> dict:
    """Every file under `root` with its size and modification time (the token cache and the run lock,
    which a refused command may take and drop, aside)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "cache" not in p.relative_to(root).parts and p.name != LOCK_FILE}


@pytest.mark.parametrize("line, status, fragment", CASES,
                         ids=[repr(c[0].replace(new_run(""), "train ")) for c in CASES])  # repr: no bare "gpu" id
def test_a_bad_command_line_is_one_line_and_changes_nothing(line, status, fragment, places, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)  # demo's and synth's default folders land here
    before = snapshot(places["root"])
    code, err = run_main(shlex.split(line.format(new=tmp_path / "new", **places)), capsys)
    assert code == status, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("mambakit") and fragment in err, err
    assert snapshot(places["root"]) == before  # a refused command wrote, moved or deleted nothing
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()  # no folder left behind


def test_a_diverging_run_stops_with_exit_1_and_saves_nothing_non_finite(places, tmp_path, capsys):
    out = tmp_path / "nan"
    argv = shlex.split(f"train --out {out} {TINY.format(**places)} --lr 1e6 --save-interval 1 --max-tokens 2560")
    code, err = run_main(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "loss: NaN or infinite" in err, err
    assert all(ckpt.checkpoint_problem(c) is None for c in ckpt.list_checkpoints(out))


def test_ctrl_c_outside_the_training_loop_is_130_and_one_line(places, tmp_path, capsys, monkeypatch):
    from mambakit.training import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "_prepare_dataset", interrupted)  # as during tokenizing
    code, err = run_main(shlex.split(f"train --out {tmp_path / 'x'} " + TINY.format(**places)), capsys)
    assert code == 130 and err == "mambakit train: interrupted\n"


def child(*argv: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mambakit", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_the_shell_sees_status_2_one_line_and_debug_shows_the_traceback(places, tmp_path):
    argv = shlex.split(f"train --out {tmp_path / 'x'} --keep-last -1 " + TINY.format(**places))
    plain = child(*argv)
    _, err = plain.communicate(timeout=120)
    assert plain.returncode == 2 and err == "mambakit train: error: keep_last: expected an int >= 0, got -1\n"
    debug = child(*argv, "--debug")
    _, err = debug.communicate(timeout=120)
    assert debug.returncode == 1 and "Traceback" in err and err.rstrip().endswith("got -1")


def test_ctrl_c_during_training_saves_and_exits_130(places, tmp_path):
    run = tmp_path / "run"
    proc = child("train", "--out", str(run), "--save-interval", "100000",
                 *shlex.split(TINY.format(**places).replace("--max-tokens 512", "--max-tokens 10M")))
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT" in out and "Traceback" not in err
    assert ckpt.checkpoint_problem(ckpt.latest_checkpoint(run)) is None
