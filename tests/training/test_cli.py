"""Command-line parsing of train / synth / demo (no training here)."""
from pathlib import Path

import pytest

from mambakit.cli import build_parser
from mambakit.cli.demo import choose_out, prepare_out
from mambakit.cli.synth import build_model, check_args, format_table, parse_curriculum, parse_lengths, schedule_options
from mambakit.cli.train import given_options
from mambakit.tasks import InductionHeads
from mambakit.tasks.recipes import RECIPES
from mambakit.training import TrainConfig, parse_count


def test_train_options_map_onto_the_config():
    args = build_parser().parse_args(
        ["train", "--out", "runs/x", "--arch", "hybrid", "--attn-layer-idx", "1,3", "--max-tokens", "1.5M",
         "--ssm-options", '{"chunk_size": 64}', "--no-bf16", "--d-model", "96"])
    options = given_options(args)
    assert options == {"arch": "hybrid", "attn_layer_idx": [1, 3], "max_tokens": 1_500_000,
                       "ssm_options": {"chunk_size": 64}, "bf16": False, "d_model": 96}
    config = TrainConfig(**options)
    assert config.seq_len == TrainConfig().seq_len  # options not given keep the defaults
    model_config = config.model_config(vocab_size=300)
    assert model_config.attn_layer_idx == [1, 3] and model_config.ssm_cfg["chunk_size"] == 64


def test_train_needs_exactly_one_of_out_and_resume():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "a", "--resume", "b"])


def test_transformer_is_attention_and_swiglu_in_every_layer():
    config = TrainConfig(arch="transformer", d_model=128, n_layer=3).model_config(vocab_size=257)
    assert config.attn_layer_idx == [0, 1, 2] and config.d_intermediate > 0
    assert config.attn_cfg["rotary_emb_dim"] == config.attn_cfg["head_dim"]


@pytest.mark.parametrize("text, expected", [
    ("64,...,1024", [64, 128, 256, 512, 1024]),
    ("256,4096", [256, 4096]),
    ("64,...,256,1000", [64, 128, 256, 1000]),
])
def test_eval_lengths_expand_by_doubling(text, expected):
    assert parse_lengths(text) == expected


def test_counts_and_bad_values():
    assert parse_count("200M") == 200_000_000 and parse_count("50k") == 50_000 and parse_count(7) == 7
    with pytest.raises(ValueError, match="count"):
        parse_count("lots")
    with pytest.raises(ValueError, match="arch"):
        TrainConfig(arch="rnn")
    with pytest.raises(ValueError, match="attn_layer_idx"):
        TrainConfig(arch="hybrid")
    with pytest.raises(ValueError, match="eval-lens"):
        parse_lengths("...,64")


def test_demo_never_replaces_a_folder_unless_told_and_then_only_run_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-00000010").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_out(run, overwrite=False)
    assert (run / "checkpoint-00000010").is_dir() and (run / "metrics.jsonl").exists()
    prepare_out(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["thesis.tex"]
    prepare_out(tmp_path / "new", overwrite=False)  # a missing or empty folder needs no permission
    with pytest.raises(NotADirectoryError, match="out"):
        choose_out(run / "thesis.tex")


def test_demo_default_folder_moves_on_when_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert choose_out(None) == Path("runs/demo")
    Path("runs/demo").mkdir(parents=True)
    assert choose_out(None) == Path("runs/demo")  # empty: free
    (Path("runs/demo") / "metrics.jsonl").write_text("")
    Path("runs/demo-2").mkdir()
    (Path("runs/demo-2") / "x").write_text("")
    assert choose_out(None) == Path("runs/demo-3")


def test_synth_eval_chunk_option():
    parse = lambda *extra: build_parser().parse_args(["synth", "induction-heads", *extra])  # noqa: E731
    assert parse().eval_chunk == 1 << 16
    assert parse("--eval-chunk", "0").eval_chunk == 0
    with pytest.raises(SystemExit):
        parse("--eval-chunk", "-5")


def test_synth_curriculum_option():
    assert parse_curriculum("64:2000:128, 1024:500") == [(64, 2000, 128), (1024, 500)]
    for bad in ("64", "64:", ":5", "64:0", "0:5", "64:5:0", "64:5:1:1", "64:1e3", "a:b", ""):
        with pytest.raises(ValueError, match="curriculum"):
            parse_curriculum(bad)
    args = build_parser().parse_args(["synth", "selective-copying", "--curriculum", "64:100"])
    assert args.curriculum == [(64, 100)]


@pytest.mark.parametrize("task", sorted(RECIPES))
def test_synth_options_left_out_take_the_task_recipe(task, tmp_path):
    recipe = RECIPES[task]
    parse = lambda *extra: build_parser().parse_args(  # noqa: E731
        ["synth", task, "--d-model", "16", "--headdim", "8", "--out", str(tmp_path), *extra])
    args = parse()
    check_args(args)
    assert (args.train_len, args.steps, args.batch_size, args.lr) == (recipe.seq_len, recipe.steps,
                                                                      recipe.batch_size, recipe.lr)
    assert args.curriculum == list(recipe.curriculum)
    assert schedule_options(args)["grad_clip"] == recipe.grad_clip
    assert schedule_options(parse("--grad-clip", "0"))["grad_clip"] is None  # 0: no clipping
    for given in (["--train-len", "512"], ["--steps", "9000"]):  # the curriculum goes with the recipe's length
        args = parse(*given)
        check_args(args)
        assert args.curriculum == []
    args = parse("--steps", "9000", "--curriculum", "64:10")
    check_args(args)
    assert args.curriculum == [(64, 10)] and args.train_len == recipe.seq_len
    # Mamba-1 takes the recipe's mixer options; Mamba-2 (no dt_scale argument) its defaults; given ones win
    # (dt_proj's weight is uniform in +-dt_scale / sqrt(dt_rank), dt_rank 1 here: beyond 1 only when scaled)
    mamba = build_model(args, InductionHeads(), "mamba", "cpu").backbone.layers[0].mixer
    assert (mamba.dt_proj.weight.abs().max() > 1) == (recipe.ssm_options("mamba").get("dt_scale", 1.0) > 1)
    build_model(args, InductionHeads(), "mamba2", "cpu")
    args = parse("--ssm-options", '{"d_conv": 2}')
    check_args(args)
    assert build_model(args, InductionHeads(), "mamba", "cpu").backbone.layers[0].mixer.dt_proj.weight.abs().max() < 1


def test_synth_ssm_options_reach_the_model():
    args = build_parser().parse_args(["synth", "induction-heads", "--d-model", "16", "--d-state", "4",
                                      "--ssm-options", '{"dt_scale": 40.0}'])
    assert args.ssm_options == {"dt_scale": 40.0}
    model = build_model(args, InductionHeads(), "mamba", "cpu")
    # dt_proj's weight is uniform in +-dt_scale / sqrt(dt_rank): dt_rank 1 here, so beyond 1 only when scaled.
    assert model.backbone.layers[0].mixer.dt_proj.weight.abs().max() > 1
    for command in (["synth", "induction-heads"], ["train"]):  # a JSON value that is not an object
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--ssm-options", "[1, 2]"])


def test_synth_table_marks_lengths_a_row_lacks():
    rows = [{"arch": "a", "params": 10, "accuracy": {64: 1.0, 128: 0.5}},
            {"arch": "b", "params": 20, "accuracy": {128: 0.25, 256: None}}]
    lines = format_table(rows, [64, 128, 256]).splitlines()
    assert lines[1].split()[2:] == ["100.0", "50.0", "-"]
    assert lines[2].split()[2:] == ["-", "25.0", "-"]


def test_synth_never_overwrites_earlier_results(tmp_path, capsys):
    from mambakit.cli import main

    command = ["synth", "induction-heads", "--arch", "mamba", "--d-model", "16", "--n-layer", "1", "--d-state", "4",
               "--train-len", "32", "--eval-lens", "32", "--steps", "2", "--batch-size", "2", "--eval-samples", "2",
               "--device", "cpu", "--out", str(tmp_path)]
    assert main(command) == 0
    first = (tmp_path / "induction-heads.json").read_bytes()
    assert main(command) == 0
    assert (tmp_path / "induction-heads.json").read_bytes() == first  # kept as it was
    assert (tmp_path / "induction-heads-2.json").exists() and (tmp_path / "induction-heads-2.png").exists()
    assert "induction-heads-2.json" in capsys.readouterr().out
