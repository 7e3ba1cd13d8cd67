"""`digiq collect`: real browsers in worker processes; determinism, resumption, recovery, data checks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from processes import browsers, digiq_executable, tree_hashes, wait_for_no_browsers

from digiq import collection
from digiq.config import Params
from digiq.params_file import validate_params
from digiq.envs.behavior import IMPATIENT, BehaviorPolicy
from digiq.envs.miniwob import BrowserConfig
from digiq.envs.policy import PolicySpec
from digiq.envs.workers import run_units
from digiq.errors import DigiqError
from digiq.pipelines import collect as stage

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TASKS = ["click-button", "enter-text"]


def config(out: Path, **collect) -> Params:
    """Params of a small collection into ``out`` (metrics and Data Docs beside it); ``collect`` overrides the section."""
    values = dict(tasks=TASKS, episodes_per_task=2, seed=11, workers=2, max_steps=6, noise=0.3, out=str(out),
                  success_band=[0.0, 1.0], required_action_kinds=["tap", "type"],
                  metrics=str(out.parent / f"{out.name}-metrics.json"), checks=str(out.parent / f"{out.name}-checks"))
    return validate_params({"collect": {**values, **collect}})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """2 tasks × 2 episodes collected by 2 workers."""
    out = tmp_path_factory.mktemp("collect") / "reference"
    outcome = stage.run(config(out, workers=2))
    assert outcome.collected_units == 2 and outcome.kept_units == 0
    return out


def test_collect_writes_a_checked_dataset(reference):
    from digiq.store import Dataset

    data = Dataset(reference)
    df = data.steps_df()
    metrics = json.loads((reference.parent / "reference-metrics.json").read_text())
    assert metrics["transitions"] == len(df) and metrics["episodes"] == 4 == len(data.trajectory_ids())
    assert set(metrics["per_task"]) == set(TASKS) and metrics["checks_passed"]
    checks = reference.parent / "reference-checks"
    assert (checks / "index.html").is_file() and not (reference / "checks").exists()
    assert json.loads((checks / "result.json").read_text())["success"] is True
    for traj in data.iter_trajectories():
        assert traj.steps[-1].done and not any(s.done for s in traj.steps[:-1])
        assert all(s.next_screenshot is not None for s in traj.steps)  # terminal steps: the page, not a black frame
        assert traj.steps[-1].reward == float(traj.success)
        for step in (traj.steps[0], traj.steps[-1]):
            assert data.load_image(step.next_screenshot, step.next_screenshot_sha256).getextrema() != ((0, 0),) * 3
    assert data.manifest["collect"]["seed"] == 11
    assert data.manifest["collect"]["behavior"] == IMPATIENT  # which π_β made the data; another one is another dataset
    assert collection.fingerprint(config(reference, behavior={}).collect) != collection.fingerprint(config(reference).collect)


def test_same_params_give_the_same_dataset_with_one_worker(reference, tmp_path):
    serial = tmp_path / "serial"
    stage.run(config(serial, workers=1))
    assert tree_hashes(serial) == tree_hashes(reference)


def test_a_deleted_shard_is_collected_again_and_nothing_else(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    shard = sorted(copy.glob("steps/*.parquet"))[0]
    shard.unlink()
    (copy / "screenshots" / "00").mkdir(exist_ok=True)
    (copy / "screenshots" / "00" / "stray.png").write_bytes(b"left by a killed run")
    outcome = stage.run(config(copy))
    assert (outcome.collected_units, outcome.kept_units) == (1, 1)
    assert outcome.metrics["pruned_screenshots"] == 1
    assert tree_hashes(copy) == tree_hashes(reference)

    outcome = stage.run(config(copy, episodes_per_task=1, shard_episodes=1))  # another plan: old shards go
    assert len(outcome.removed_shards) == 2 and outcome.metrics["episodes"] == 2


def test_failed_checks_stop_the_stage_with_a_readable_message(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    with pytest.raises(DigiqError) as err:
        stage.run(config(copy, success_band=(0.99, 1.0)))
    message = str(err.value)
    assert "collect_raw failed: episode success rate inside [0.99, 1]" in message and "index.html" in message
    assert not (copy / "manifest.json").exists()  # an unchecked dataset is not complete
    assert json.loads((tmp_path / "copy-checks" / "result.json").read_text())["success"] is False


def test_a_foreign_folder_is_not_touched(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(DigiqError, match="was not written by `digiq collect`"):
        stage.run(config(tmp_path))
    with pytest.raises(DigiqError, match="unknown MiniWoB task"):
        stage.run(config(tmp_path / "new", tasks=["click-buttons"]))


class FlakyPolicy:
    """π_β that breaks its worker once per marker file: kills its own Chromium, or hangs."""

    def __init__(self, noise: float, crash_marker: str, hang_marker: str):
        self.inner = BehaviorPolicy(noise)
        self.crash_marker, self.hang_marker = Path(crash_marker), Path(hang_marker)

    def reset(self, seed: int) -> None:
        self.inner.reset(seed)

    def act(self, view):
        if view.task == "click-button" and _claim(self.crash_marker):
            _kill_own_chromium()
        if view.task == "enter-text" and _claim(self.hang_marker):
            time.sleep(3600)
        return self.inner.act(view)


def _claim(marker: Path) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _kill_own_chromium() -> None:
    """SIGKILL the Chromium browser process (not chromedriver) of this worker: a browser crash."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            pid = int(cmdline.parent.name)
            if args[0].endswith(b"chromium") and not any(a.startswith(b"--type=") for a in args) and os.getpgid(pid) == os.getpgrp():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
            continue


def test_crashed_and_hung_browsers_are_restarted_and_episodes_replayed(reference, tmp_path):
    params = config(reference)
    section = params.collect
    units = collection.plan(section)
    profiles_before = set(Path(tempfile.gettempdir()).glob("digiq-chromium-*"))
    out = tmp_path / "flaky"
    run = dataclasses.replace(
        collection.behavior_run(section, out, params.gamma, BrowserConfig(time_limit_s=section.time_limit_s)),
        policy=PolicySpec(f"{__name__}:FlakyPolicy", {"noise": section.noise, "crash_marker": str(tmp_path / "crash"),
                                                      "hang_marker": str(tmp_path / "hang")}),
        hang_timeout_s=20.0,  # a restarted browser on a loaded 2-core machine is slow to start (docs/benchmarks.md)
    )
    restarts: list[str] = []
    summaries = run_units(units, run, workers=2, on_restart=restarts.append)
    assert (tmp_path / "crash").exists() and (tmp_path / "hang").exists()  # both failures happened
    # crash: the worker restarts its browser and replays that one episode from its seed; no worker is replaced for it
    assert [s["retries"] for s in summaries if s["task"] == "click-button" and s["retries"]] == [1], summaries
    assert not any(r.startswith("click-button") for r in restarts), restarts
    assert any(r.startswith("enter-text") for r in restarts), restarts  # hang: the silent worker was replaced
    ref = tree_hashes(reference)
    assert {k: v for k, v in tree_hashes(out).items() if k.startswith("steps/")} == {k: v for k, v in ref.items() if k.startswith("steps/")}
    assert set(Path(tempfile.gettempdir()).glob("digiq-chromium-*")) <= profiles_before  # killed worker's profile removed
    assert browsers() == []


def test_cli_collect_reuses_finished_shards(reference, tmp_path):
    import typer
    from typer.testing import CliRunner

    from digiq.cli.collect import register

    app = typer.Typer()
    register(app)  # `collect` and `rollout`, as cli/main.py registers them under `digiq`
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    args = ["collect", "--tasks", ",".join(TASKS), "--episodes", "2", "--seed", "11", "-S", "collect.max_steps=6",
            "-S", "collect.noise=0.3", "--out", str(copy), "-S", "collect.required_action_kinds=[tap,type]",
            "-S", f"collect.metrics={tmp_path / 'm.json'}", "-S", f"collect.checks={tmp_path / 'checks'}",
            "--params", str(tmp_path / "absent.yaml")]
    result = CliRunner().invoke(app, [*args, "-S", "collect.success_band=[0,1]"])
    assert result.exit_code == 0, result.output
    assert "0 shards collected, 2 kept" in result.output and "click-button" in result.output
    assert tree_hashes(copy) == tree_hashes(reference)
    bad = CliRunner().invoke(app, [*args, "-S", "collect.success_band=[0.6,0.2]"])
    assert bad.exit_code == 2 and "-S collect.success_band=[0.6,0.2]: collect.success_band: " in bad.output


def test_kill_9_mid_collection_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """`digiq collect` SIGKILLed after its first shard: no browser survives, and the re-run's dataset is byte-equal
    to an uninterrupted collection with the same seed."""
    import subprocess

    import yaml

    plan = {"tasks": TASKS, "episodes_per_task": 3, "seed": 11, "workers": 2, "max_steps": 6, "noise": 0.3,
            "shard_episodes": 1, "success_band": [0.0, 1.0], "required_action_kinds": ["tap", "type"]}
    uninterrupted = tmp_path / "uninterrupted"
    stage.run(config(uninterrupted, **plan))

    killed = tmp_path / "killed"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"collect": {**plan, "out": str(killed), "metrics": str(tmp_path / "m.json"),
                                                  "checks": str(tmp_path / "checks")}}))
    command = [digiq_executable(), "collect", "--params", str(params)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(killed.glob("steps/*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_for_no_browsers() == []  # workers follow their parent (PR_SET_PDEATHSIG) and close their browsers
    # counted once the orphaned workers are gone: one may still have finished its shard (atomically) meanwhile
    shards_at_kill = len(list(killed.glob("steps/*.parquet")))
    assert 1 <= shards_at_kill < 6 and not (killed / "manifest.json").exists()
    # a kill during a screenshot write leaves its temporary file (digiq.store._write_new_file): the re-run removes it
    left_by_kill = next(killed.glob("screenshots/*/*.png")).with_name(".x.png.0123456789abcdef.tmp")
    left_by_kill.write_bytes(b"half a png")

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{6 - shards_at_kill} shards collected, {shards_at_kill} kept" in rerun.stdout
    assert tree_hashes(killed) == tree_hashes(uninterrupted)
