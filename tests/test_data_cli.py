"""`digiq import-digiq`, `digiq data stats` and `digiq data show` through the real Typer app."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from digiq.actions import describe_action, parse_action
from digiq.cli.main import app
from digiq.config import Params
from digiq.schema import discounted_returns
from fixtures_official import make_screenshots, official_trajectories, save_official, write_hostile

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("cli")
    shots = make_screenshots(root / "images", 60)
    source = official_trajectories(shots, 7, arrays="numpy", image_dim=16, candidates=4, rep_dim=8, seed=21)
    save_official(source, root / "digiq.pt")
    result = runner.invoke(app, ["import-digiq", str(root / "digiq.pt"), "--images", str(root / "images"), "--out", str(root / "ds"), "--params", str(root / "none.yaml")])
    assert result.exit_code == 0, result.output
    steps = sum(map(len, source))
    assert f"imported 7 trajectories, {steps} steps" in result.stdout and "skipped 0 bad trajectories" in result.stdout
    assert f"candidates: {4 * steps} rows; precomputed arrays: {steps} rows" in result.stdout
    return root / "ds", source


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "import-digiq" in result.stdout and "data" in result.stdout
    result = runner.invoke(app, ["data", "--help"])
    assert "stats" in result.stdout and "show" in result.stdout
    result = runner.invoke(app, ["import-digiq", "--help"])
    assert "--skip-bad" in result.stdout and "--images" in result.stdout


def test_stats_json_matches_the_source(imported):
    ds, source = imported
    result = runner.invoke(app, ["data", "stats", str(ds), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    successes = [any(float(d["reward"]) > 0 for d in traj) for traj in source]
    assert stats["trajectories"] == len(source) and stats["steps"] == sum(map(len, source))
    assert stats["success_rate"] == pytest.approx(sum(successes) / len(source))
    assert stats["mean_length"] == pytest.approx(sum(map(len, source)) / len(source))
    kinds = Counter(parse_action(d["action"]).kind for traj in source for d in traj)
    assert stats["action_kinds"] == dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    per_task: dict[str, list[list[dict[str, Any]]]] = {}
    for traj in source:
        per_task.setdefault(traj[0]["task"], []).append(traj)
    assert [t["task"] for t in stats["tasks"]] == sorted(per_task)
    for task in stats["tasks"]:
        trajs = per_task[task["task"]]
        assert task["trajectories"] == len(trajs) and task["steps"] == sum(map(len, trajs))
        assert sum(task["action_kinds"].values()) == task["steps"]
    assert stats["tables"] == {"candidates": 4 * stats["steps"], "official": stats["steps"], "precomputed": stats["steps"]}


def test_stats_table(imported):
    ds, source = imported
    result = runner.invoke(app, ["data", "stats", str(ds)])
    assert result.exit_code == 0, result.output
    assert f"trajectories {len(source)}" in result.stdout and "actions by kind" in result.stdout and "per task" in result.stdout


def test_show_prints_each_step(imported):
    ds, source = imported
    result = runner.invoke(app, ["data", "show", str(ds), "--traj", "000002", "--json"])
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    raw = source[2]
    returns = discounted_returns([float(d["reward"]) for d in raw], Params().gamma)  # imported with the default γ
    assert view["task"] == view["goal"] == raw[0]["task"]
    assert [s["action"] for s in view["steps"]] == [d["action"] for d in raw]
    assert [s["description"] for s in view["steps"]] == [describe_action(parse_action(d["action"])) for d in raw]
    assert [s["reward"] for s in view["steps"]] == [float(d["reward"]) for d in raw]
    assert [s["done"] for s in view["steps"]] == [bool(d["done"]) for d in raw]
    assert [s["mc_return"] for s in view["steps"]] == pytest.approx(returns)
    assert all(Path(s["screenshot"]).is_file() and s["candidates"] == 4 for s in view["steps"])
    table = runner.invoke(app, ["data", "show", str(ds), "--traj", "000002"])
    assert table.exit_code == 0 and "trajectory 000002" in table.stdout
    assert describe_action(parse_action(raw[0]["action"]))[:12] in table.stdout


def test_show_unknown_trajectory_is_one_line(imported):
    ds, _ = imported
    result = runner.invoke(app, ["data", "show", str(ds), "--traj", "00000x"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "no trajectory '00000x'" in result.stderr and "did you mean" in result.stderr


def test_stats_on_a_folder_that_is_not_a_dataset(tmp_path):
    result = runner.invoke(app, ["data", "stats", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.json" in result.stderr


def test_import_defaults_come_from_params(tmp_path):
    shots = make_screenshots(tmp_path / "images", 20)
    source = official_trajectories(shots, 3, arrays=None, seed=1)
    save_official(source, tmp_path / "a.pt")
    (tmp_path / "params.yaml").write_text(f"gamma: 0.5\ncollect:\n  out: {tmp_path / 'raw'}\n")
    result = runner.invoke(app, ["import-digiq", str(tmp_path / "a.pt"), "--images", str(tmp_path / "images"), "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text())["gamma"] == 0.5
    assert "made with another γ" in result.stderr  # the file's returns used 0.95


def test_import_skip_bad_reports_the_count(tmp_path):
    shots = make_screenshots(tmp_path / "images", 30)
    source = official_trajectories(shots, 4, arrays=None, seed=2)
    source[2][0]["action"] = "click somewhere"
    save_official(source, tmp_path / "a.pt")
    args = ["import-digiq", str(tmp_path / "a.pt"), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "ds"), "--params", str(tmp_path / "none.yaml")]
    failed = runner.invoke(app, args)
    assert failed.exit_code == 2 and not (tmp_path / "ds").exists()
    assert "trajectory 2, step 0, action: malformed action decision 'click somewhere'" in failed.stderr
    result = runner.invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "imported 3 trajectories" in result.stdout and "skipped 1 bad trajectories" in result.stdout
    assert "skipped: " in result.stderr and "trajectory 2, step 0, action" in result.stderr


def test_import_refuses_a_file_that_would_run_code(tmp_path):
    (tmp_path / "images").mkdir()
    marker = tmp_path / "pwned"
    write_hostile(tmp_path / "evil.pt", marker, "os.system")
    result = runner.invoke(app, ["import-digiq", str(tmp_path / "evil.pt"), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0
    assert "refused" in result.stderr and "posix.system" in result.stderr
    assert not marker.exists() and not (tmp_path / "ds").exists()


def test_import_rejects_gamma_out_of_range(tmp_path):
    result = runner.invoke(app, ["import-digiq", "x.pt", "--images", str(tmp_path), "-S", "gamma=1.5",
                                 "--params", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "-S gamma=1.5: gamma: " in result.output and "less than or equal to 1" in result.output
