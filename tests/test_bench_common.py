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


def test_errors_against_reports_output_and_each_gradient():
    import torch

    from mambakit.bench.common import errors_against

    inputs = {"x": torch.randn(5, 3, requires_grad=True), "w": torch.randn(3, requires_grad=True),
              "fixed": torch.randn(3)}
    exact = lambda i: (i["x"] * i["w"]).sum(-1) + i["fixed"].sum()
    wrong_w_grad = lambda i: (i["x"] * (i["w"] + 0.1 * i["w"].detach())).sum(-1) + i["fixed"].sum()
    same = errors_against(exact, exact, inputs)
    assert set(same) == {"out", "x", "w"} and max(same.values()) == 0.0
    errs = errors_against(wrong_w_grad, exact, inputs)
    assert errs["w"] < 1e-12 and errs["x"] > 0.01 and errs["out"] > 0.01
