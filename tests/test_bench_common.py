import json

from mambakit.bench.common import format_table, save_rows


def test_save_rows_merges_by_measurement_key(tmp_path):
    path = tmp_path / "kernels.json"
    save_rows(path, [{"op": "ssd", "impl": "a", "L": 512, "fwd_ms": 1.0}, {"op": "ssd", "impl": "b", "L": 512, "fwd_ms": 2.0}])
    doc = save_rows(path, [{"op": "ssd", "impl": "a", "L": 512, "fwd_ms": 0.5}])
    rows = {r["impl"]: r["fwd_ms"] for r in json.loads(path.read_text())["rows"]}
    assert rows == {"a": 0.5, "b": 2.0}
    assert "device" in doc["environment"] and "torch" in doc["environment"]["versions"]


def test_format_table_aligns_and_marks_missing():
    text = format_table([{"impl": "x", "fwd_ms": 1.23456}, {"impl": "longer"}], ["impl", "fwd_ms"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "1.235" in lines[1] and lines[2].endswith("-")
