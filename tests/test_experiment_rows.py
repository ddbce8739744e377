"""The experiment scripts' shared raw-rows file (experiments/raw_rows.py): resuming, order, atomic rewrites."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
from raw_rows import RawRows  # noqa: E402


def test_rows_resume_from_the_file_and_keep_their_order(tmp_path, capsys):
    path = tmp_path / "out" / "rows.json"
    rows = RawRows(path, key=lambda r: (r["config"], r["seed"]), sort=lambda r: (r["config"], r["seed"]))
    assert len(rows) == 0 and not path.exists()
    rows.add({"config": "b", "seed": 1, "miou": 0.25}, "b seed 1: 25.0")
    rows.add({"config": "a", "seed": 0, "miou": 0.5})
    assert capsys.readouterr().out == "b seed 1: 25.0\n"  # one line per row that has one
    on_disk = json.loads(path.read_text())["rows"]
    assert [(r["config"], r["seed"]) for r in on_disk] == [("a", 0), ("b", 1)]  # the file is sorted
    assert [r["config"] for r in rows] == ["b", "a"]  # memory keeps the measured order
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.json"]  # no temporary file left behind
    again = RawRows(path, key=lambda r: (r["config"], r["seed"]))  # a resumed run
    assert ("a", 0) in again and ("b", 1) in again and ("a", 1) not in again and len(again) == 2


@pytest.mark.parametrize("script", sorted(EXPERIMENTS.glob("*.py")), ids=lambda p: p.name)
def test_experiment_scripts_parse(script):
    ast.parse(script.read_text(), filename=str(script))  # they are not run by the suite; they must stay valid
