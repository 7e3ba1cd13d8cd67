"""A real `dvc repro` of the whole DAG (dvc.yaml as committed) on a small configuration.

Every stage runs through its `digiq <stage>` command in a copy of the repository: real browsers, the real
default VLM, Feast, Great Expectations. Only params.yaml is made smaller.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    "collect": {"tasks": ["click-button", "enter-text"], "episodes_per_task": 6, "shard_episodes": 3, "max_steps": 5,
                "success_band": [0.0, 1.0], "required_action_kinds": ["tap"]},
    "label": {"yes_band": [0.0, 1.0], "min_count": 1000},
    "finetune": {"epochs": 1, "batch_size": 8, "val_fraction": 0.34, "max_train_seconds": 120.0},
    "candidates": {"k": 8, "min_mean_distinct": 1.0, "min_frac_two_distinct": 0.0},
    "embed": {"chunk_states": 16},
    "critic": {"updates": 40, "batch_size": 16, "log_every": 10},
    "actor": {"methods": ["digiq", "bc"], "n": 4, "updates": 20, "batch_size": 16},
    "evaluate": {"methods": ["digiq", "bc", "behavior", "random"], "tasks": ["click-button"], "episodes_per_task": 2,
                 "episodes_per_unit": 2, "k": 4},
    "report": {"experiments": False},
}


def _small_project(root: Path) -> Path:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        source = REPO / name
        if source.is_file() and not name.startswith("tests/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=digiq tests", "-c", "user.email=tests@digiq.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "small configuration"], cwd=root, check=True)
    return root


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1500)


def test_dvc_repro_runs_every_stage_of_a_small_configuration(tmp_path):
    root = _small_project(tmp_path / "project")
    run = _dvc(root, "repro")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for stage in ("build-model", "collect", "label", "finetune", "candidates", "embed", "features", "critic",
                  "actor@digiq", "actor@bc", "evaluate", "report"):
        assert f"Running stage '{stage}'" in run.stdout, stage

    collect = json.loads((root / "metrics/collect.json").read_text())
    assert collect["episodes"] == 12 and collect["checks_passed"]
    critic = json.loads((root / "metrics/critic.json").read_text())
    assert critic["variant"] == "finetuned"
    evaluation = json.loads((root / "metrics/eval.json").read_text())
    assert set(evaluation["methods"]) == {"digiq", "bc", "behavior", "random"}
    assert all(m["episodes"] == 2 for m in evaluation["methods"].values())
    assert "Digi-Q" in (root / "reports/report.md").read_text()
    page = (root / "reports/report.html").read_text()
    assert "data:image/svg+xml;base64," in page and 'src="http' not in page  # plots embedded, nothing fetched

    again = _dvc(root, "status")
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout
