"""The README's Quick start runs as written."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"## Quick start\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["y"].shape == (2, 1000, 256) and torch.isfinite(scope["y"]).all()
    assert scope["logits"].shape == (1, len("def fibonacci(n):"), 264)
    assert capsys.readouterr().out  # the stream printed text
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out-hf" / "config.json").is_file()
