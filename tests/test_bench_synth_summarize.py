"""`benchmarks/synth_tasks.py summarize` merges new part files into the device's results file without
dropping the rows already there."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import synth_tasks  # noqa: E402


def part(tag: str, acc: float) -> dict:
    row = {"task": "induction-heads", "tag": tag, "arch": "mamba", "params": 1000, "accuracy": {"256": acc},
           "train_len": 256, "steps": 10, "batch_size": 8, "train_s": 1.0, "final_loss": 0.5}
    return {"device": "cpu", "environment": {"device": "cpu"}, "row": row}


def test_summarize_keeps_earlier_rows_and_replaces_those_of_a_new_part(tmp_path, capsys):
    for tag, acc in (("a", 0.25), ("b", 0.5)):
        (tmp_path / f"synth-part-{tag}.json").write_text(json.dumps(part(tag, acc)))
    synth_tasks.summarize(argparse.Namespace(out=tmp_path))
    for f in tmp_path.glob("synth-part-*.json"):
        f.unlink()  # as when the parts of a later run are summarized into the same folder
    (tmp_path / "synth-part-b.json").write_text(json.dumps(part("b", 1.0)))
    (tmp_path / "synth-part-c.json").write_text(json.dumps(part("c", 0.75)))
    synth_tasks.summarize(argparse.Namespace(out=tmp_path))
    rows = json.loads((tmp_path / "synth-cpu.json").read_text())["rows"]
    assert {r["tag"]: r["accuracy"]["256"] for r in rows} == {"a": 0.25, "b": 1.0, "c": 0.75}
    assert "induction-heads" in capsys.readouterr().out
