"""A real `dvc repro` of the whole DAG (dvc.yaml as committed) on a small configuration.

Every stage runs through its `digiq <stage>` command in a copy of the repository: real browsers, the real
default VLM, Feast, Great Expectations. Only params.yaml is made smaller.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
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
    "evaluate": {"methods": ["digiq", "bc", "critic-greedy", "behavior", "random"], "tasks": ["click-button"], "episodes_per_task": 2,
                 "episodes_per_unit": 2},
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
    for stage in ("build-model", "collect", "label", "finetune", "candidates", "embed", "channels", "features", "critic",
                  "actor@digiq", "actor@bc", "evaluate", "report"):
        assert f"Running stage '{stage}'" in run.stdout, stage

    collect = json.loads((root / "metrics/collect.json").read_text())
    assert collect["episodes"] == 12 and collect["checks_passed"]
    critic = json.loads((root / "metrics/critic.json").read_text())
    assert critic["variant"] == "finetuned"
    evaluation = json.loads((root / "metrics/eval.json").read_text())
    sampled, greedy = (evaluation["protocols"][p]["methods"] for p in ("sample", "greedy"))
    assert set(sampled) == {"digiq", "bc", "behavior", "random"}
    assert set(greedy) == {"digiq", "bc", "critic-greedy", "behavior-mode"}
    assert all(m["episodes"] == 2 for m in [*sampled.values(), *greedy.values()])
    assert set(evaluation["protocols"]["sample"]["paired"]["against"]) == {"bc", "behavior", "random"}
    critic_inputs = json.loads((root / "models/critic/config.json").read_text())["config"]["inputs"]
    assert critic_inputs["q"] == ["vlm", "image", "goal", "prev_action", "fields", "action"]
    assert "Digi-Q" in (root / "reports/report.md").read_text()
    page = (root / "reports/report.html").read_text()
    assert re.search(r"<figure>\s*<svg\b", page) and 'src="http' not in page  # charts inline, nothing fetched

    again = _dvc(root, "status")
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout

    _data_stages_rerun_from_scratch_give_the_same_hashes(root)
    _a_fresh_clone_pulls_identical_outputs_from_a_local_remote(root, tmp_path)
    _queued_experiments_run_two_at_a_time_and_are_listed(root)


DATA_STAGES = {"collect": "data/raw", "label": "data/labels.parquet", "candidates": "data/candidates.parquet"}


def _out_hashes(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {stage: next(o["md5"] for o in lock[stage]["outs"] if o["path"] == path) for stage, path in DATA_STAGES.items()}


def _data_stages_rerun_from_scratch_give_the_same_hashes(root: Path) -> None:
    before = _out_hashes(root)
    for stage, path in DATA_STAGES.items():
        shutil.rmtree(root / path) if (root / path).is_dir() else (root / path).unlink()  # collect's output persists
        run = _dvc(root, "repro", "--force", "--single-item", stage)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert _out_hashes(root) == before


UNCACHED = ["metrics", "plots", "reports", "dvclive", "data/checks", "data/eval"]  # the `cache: false` outputs (docs/remote.md)


def _file_hashes(root: Path, paths: list[str]) -> dict[str, str]:
    import hashlib

    files = [f for p in paths for f in ([root / p] if (root / p).is_file() else sorted((root / p).rglob("*"))) if f.is_file()]
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _a_fresh_clone_pulls_identical_outputs_from_a_local_remote(root: Path, tmp_path: Path) -> None:
    git = ["git", "-c", "user.name=digiq tests", "-c", "user.email=tests@digiq.invalid"]
    assert _dvc(root, "remote", "add", "-d", "store", str(tmp_path / "remote")).returncode == 0
    push = _dvc(root, "push")
    assert push.returncode == 0, push.stdout[-3000:] + push.stderr[-3000:]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)  # dvc.lock, .dvc/config
    subprocess.run([*git, "add", "-f", *UNCACHED], cwd=root, check=True)  # git-ignored here, they travel with git
    subprocess.run([*git, "commit", "-qm", "results"], cwd=root, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    pull = _dvc(clone, "pull")
    assert pull.returncode == 0, pull.stdout[-3000:] + pull.stderr[-3000:]
    status = _dvc(clone, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    outputs = ["models/base", "data/raw", "data/labels.parquet", "models/finetuned", "data/candidates.parquet",
               "data/embeddings/finetuned", "models/critic", "models/actor/digiq", "metrics/eval.json"]
    assert _file_hashes(clone, outputs) == _file_hashes(root, outputs)


def _queued_experiments_run_two_at_a_time_and_are_listed(root: Path) -> None:
    import time

    for n in (2, 3):
        queued = _dvc(root, "exp", "run", "--queue", "-n", f"n{n}", "-S", f"actor.n={n}")
        assert queued.returncode == 0, queued.stdout + queued.stderr
    start = _dvc(root, "queue", "start", "-j", "2")
    assert start.returncode == 0, start.stdout + start.stderr
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = _dvc(root, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(5)
    assert "Failed" not in status and status.count("Success") == 2, status
    shown = _dvc(root, "exp", "show", "--csv")
    assert shown.returncode == 0, shown.stderr
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    runs = {row["Experiment"]: row for row in rows if row["Experiment"] in ("n2", "n3")}
    assert set(runs) == {"n2", "n3"}, shown.stdout
    assert {runs[name]["actor.n"] for name in runs} == {"2", "3"}
