"""Packaging basics: the license the metadata names, py.typed, one version, every extra documented, and the
README's list of official names true."""
import re
from pathlib import Path

import pytest

import mambakit

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
README = (ROOT / "README.md").read_text()


def test_the_license_file_is_the_license_the_metadata_names():
    assert PYPROJECT["license"] == "Apache-2.0" and PYPROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_py_typed_ships_and_the_version_is_written_once():
    assert (Path(mambakit.__file__).parent / "py.typed").is_file()
    assert "version" not in PYPROJECT and "version" in PYPROJECT["dynamic"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", mambakit.__version__)


def test_every_extra_is_documented_in_the_readme():
    install = re.search(r"## Install\n(.*?)\n## ", README, re.S).group(1)
    for extra in PYPROJECT["optional-dependencies"]:
        assert f"- `{extra}`:" in install, extra


def test_the_official_names_the_readme_lists_exist():
    intro = README.split("## The two commands")[0]
    top = re.search(r"- from `mambakit`: (.*?);\n- from", intro, re.S).group(1)
    utils = re.search(r"- from `mambakit.utils.generation`: (.*?) \(", intro, re.S).group(1)
    names = re.findall(r"`(\w+)`", re.sub(r"\(with [^)]*\)|\(the last two[^)]*\)", "", top))
    assert len(names) >= 10
    missing = [n for n in names if not hasattr(mambakit, n)]
    from mambakit.utils import generation

    missing += [n for n in re.findall(r"`(\w+)`", utils) if not hasattr(generation, n)]
    methods = re.search(r"\(with (.*?)\)", top, re.S).group(1)
    missing += [m for m in re.findall(r"`(\w+)`", methods) if not hasattr(mambakit.MambaLMHeadModel, m)]
    assert not missing, missing
