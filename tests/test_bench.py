"""`digiq bench`: runs benchmark scripts, gathers their JSON, and records a failing one without stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from digiq import bench as B
from digiq.cli.main import app
from digiq.errors import DigiqError

ROOT = Path(__file__).resolve().parents[1]


def test_the_last_json_object_after_progress_lines_is_the_result():
    text = 'step 1 {not json}\n{"a": 1}\nmore\n{\n  "b": {"c": [1, 2]}\n}\n'
    assert B.last_json_object(text) == {"b": {"c": [1, 2]}}
    with pytest.raises(DigiqError, match="no JSON result"):
        B.last_json_object("only text\n")


def test_bench_runs_a_real_benchmark_and_records_a_missing_input(tmp_path):
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["bench", "--only", "import", "--quick", "--out", str(out), "--root", str(ROOT),
                                      "--stages", str(tmp_path / "none.json")])
    assert result.exit_code == 0, result.output
    entry = json.loads(out.read_text())["benchmarks"]["import"]
    assert entry["result"]["steps"] == 200 and entry["result"]["import_seconds"] > 0
    assert "import-digiq of 200 official-format steps" in out.with_suffix(".md").read_text()

    results = B.run_all(["embed"], tmp_path, tmp_path / "r.json")  # a project without the DAG's outputs
    assert "needs data/raw, models/finetuned" in results["benchmarks"]["embed"]["error"]
    table = (tmp_path / "r.md").read_text()
    assert "| embed | failed: " in table and "benchmark embed needs data/raw" in table
    with pytest.raises(DigiqError, match="unknown benchmark"):
        B.run_all(["embedd"], tmp_path, tmp_path / "r.json")
