"""Rollouts on Ray (``executor: ray``): a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster), real
browsers. A collection and an evaluation equal the local pool's byte for byte (the evaluation: its episodes and
metrics, all but the timings); a killed actor process, a browser crash and a lost node end with every episode once
and the shards of an uninterrupted run; without Ray installed, one clear error names the setting."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from processes import tree_hashes
from test_collect import _claim, _kill_own_chromium

from digiq import collection
from digiq.envs.behavior import BehaviorPolicy
from digiq.envs.browser_cleanup import end_orphan_browsers
from digiq.envs.miniwob import BrowserConfig
from digiq.envs.policy import PolicySpec
from digiq.envs.workers import run_units
from digiq.params_file import validate_params
from digiq.pipelines import collect as collect_stage
from digiq.pipelines import evaluate as evaluate_stage

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.browser]

TASKS = ["click-button", "enter-text"]


def collect_section(out: Path, **collect) -> dict:
    """2 tasks × 2 episodes, one per shard, into ``out`` (metrics and Data Docs beside it)."""
    return dict(tasks=TASKS, episodes_per_task=2, seed=11, workers=2, max_steps=6, noise=0.3, shard_episodes=1,
                out=str(out), success_band=[0.0, 1.0], required_action_kinds=["tap", "type"],
                metrics=str(out.parent / f"{out.name}-metrics.json"), checks=str(out.parent / f"{out.name}-checks"), **collect)


def collect_params(out: Path, **collect):
    return validate_params({"collect": collect_section(out, **collect)})


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of 2 CPUs each (a head and a worker node); this process is the driver. Every browser and Ray
    process it started is ended on teardown."""
    from ray.cluster_utils import Cluster

    fast_failure = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved]))  # FlakyPolicy, in actors
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                         "_system_config": fast_failure})
    worker_node = nodes.add_node(num_cpus=2)
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes, worker_node
    finally:
        ray.shutdown()
        nodes.shutdown()
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
        time.sleep(1)
        end_orphan_browsers()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """2 tasks × 2 episodes, one episode per shard, collected by the local pool."""
    out = tmp_path_factory.mktemp("ray") / "local"
    collect_stage.run(collect_params(out))
    return out


def recorded(root: Path) -> dict[str, str]:
    return {k: v for k, v in tree_hashes(root).items() if k.startswith(("steps/", "screenshots/"))}


def test_ray_collection_equals_the_local_pools(cluster, reference, tmp_path):
    out = tmp_path / "ray"
    outcome = collect_stage.run(collect_params(out, executor="ray"))
    assert outcome.collected_units == 4
    assert tree_hashes(out) == tree_hashes(reference)


class FlakyPolicy:
    """π_β that breaks its Ray actor once per marker: SIGKILLs the actor process (click-button), then hangs (the
    same unit, re-run), kills the actor's Chromium (enter-text); or hangs on the node ``doomed`` until the test
    removes that node."""

    def __init__(self, noise: float, markers: str, doomed: str | None = None):
        self.inner, self.markers, self.doomed = BehaviorPolicy(noise), Path(markers), doomed

    def reset(self, seed: int) -> None:
        self.inner.reset(seed)

    def act(self, view):
        if self.doomed is not None:
            if ray.get_runtime_context().get_node_id() == self.doomed and _claim(self.markers / "hang"):
                time.sleep(3600)
        elif view.task == "click-button" and _claim(self.markers / "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif view.task == "click-button" and _claim(self.markers / "hang"):
            time.sleep(3600)
        elif view.task == "enter-text" and _claim(self.markers / "crash"):
            _kill_own_chromium()
        return self.inner.act(view)


def flaky_run(reference: Path, out: Path, markers: Path, doomed: str | None = None):
    params = collect_params(reference)
    section = params.collect
    markers.mkdir()
    run = collection.behavior_run(section, out, params.gamma, BrowserConfig(time_limit_s=section.time_limit_s))
    policy = PolicySpec(f"{__name__}:FlakyPolicy", {"noise": section.noise, "markers": str(markers), "doomed": doomed})
    return collection.plan(section), dataclasses.replace(run, policy=policy, hang_timeout_s=20.0)


def test_a_killed_a_hung_actor_and_a_crashed_browser_lose_and_duplicate_nothing(cluster, reference, tmp_path):
    units, run = flaky_run(reference, tmp_path / "out", tmp_path / "markers")
    restarts: list[str] = []
    steps = []
    summaries = run_units(units, run, workers=2, on_restart=restarts.append, on_step=lambda: steps.append(1), executor="ray")
    assert {p.name for p in (tmp_path / "markers").iterdir()} == {"kill", "hang", "crash"}  # every fault happened
    assert sorted((s["task"], s["index"]) for s in summaries) == [(t, i) for t in TASKS for i in range(2)]
    assert [s["retries"] for s in summaries if s["retries"]] == [1]  # the crashed browser: its episode replayed
    assert any(r.startswith("click-button") and "restarted (" in r for r in restarts), restarts  # Ray restarted the actor
    assert any(r.startswith("click-button") and "silent for 20 s" in r for r in restarts), restarts  # the hung one
    assert len(steps) >= sum(s["steps"] for s in summaries)  # progress: every step played (retried ones too)
    assert recorded(tmp_path / "out") == recorded(reference)
    assert orphan_browsers() == []  # the killed actor's browser: ended by its successor


def eval_params(tmp_path: Path, sections: dict | None = None, **evaluate):
    values = {**dict(methods=["behavior", "random"], protocols=["sample"], tasks=["click-button"], episodes_per_task=2, seed=1000,
                     workers=2, episodes_per_unit=1, shards=str(tmp_path / "shards"), out=str(tmp_path / "eval.json"),
                     plots=str(tmp_path / "eval.csv"), actors=str(tmp_path / "actors")), **evaluate}
    col = {"seed": 0, "tasks": ["click-button"], "episodes_per_task": 60, "noise": 0.3, "max_steps": 4}
    return validate_params({"collect": col, "evaluate": values, "candidates": {"k": 8}, **(sections or {})})


def test_ray_evaluation_equals_the_local_pools(cluster, tmp_path):
    local = evaluate_stage.run(eval_params(tmp_path / "local"))
    on_ray = evaluate_stage.run(eval_params(tmp_path / "ray", executor="ray"))
    assert {k: v for k, v in on_ray.items() if k != "timing"} == {k: v for k, v in local.items() if k != "timing"}
    assert (tmp_path / "ray" / "eval.csv").read_bytes() == (tmp_path / "local" / "eval.csv").read_bytes()
    shards = sorted(p.relative_to(tmp_path / "local" / "shards") for p in (tmp_path / "local" / "shards").rglob("*.json"))
    assert len(shards) == 4  # behavior and random, 2 episodes each
    for name in shards:
        episodes = [json.loads((tmp_path / side / "shards" / name).read_text())["episodes"] for side in ("local", "ray")]
        assert episodes[0] == episodes[1]


def test_a_shared_model_per_node_equals_a_model_per_browser(cluster, tmp_path):
    """A trained chooser reading every channel (v(s_prev) and the previous page: episode state crosses the actor
    boundary) evaluated by 4 browser actors on 2 nodes: with ``shared_model`` (one feature server per node, batching
    its browsers' steps) every episode equals the one played with a model in every actor."""
    import torch
    from test_channels import save_tiny_bert
    from tiny_llava import save_tiny_llava

    from digiq.actor import CandidatePolicy
    from digiq.channels import ORDER, STATE_CHANNELS, Inputs
    from digiq.config import ActorParams
    from digiq.live_features import LiveFeaturizer

    llava, bert = save_tiny_llava(tmp_path / "llava"), save_tiny_bert(tmp_path / "bert")
    inputs = Inputs(q=list(ORDER), v=list(STATE_CHANNELS))
    channels = {"model": str(llava), "encoder": str(bert), "dtype": "float32"}
    dims = LiveFeaturizer("finetuned", str(llava), 1, "last", "float32", "cpu", channels={**channels, "batch_size": 4}).dims(inputs)
    torch.manual_seed(0)
    CandidatePolicy(*dims, ActorParams(inputs=inputs), method="digiq").save_pretrained(tmp_path / "actors" / "digiq")
    sections = {"embed": {"models": {"finetuned": str(llava)}, "layer": 1, "dtype": "float32", "device": "cpu"},
                "channels": channels}
    runs = {}
    for shared in (False, True):
        root = tmp_path / f"shared-{shared}"
        params = eval_params(root, sections, methods=["digiq"], reference="digiq", episodes_per_task=4, workers=4,
                             actors=str(tmp_path / "actors"), executor="ray", shared_model=shared)
        runs[shared] = (evaluate_stage.run(params), root)
    (per_worker, root_a), (per_node, root_b) = runs[False], runs[True]
    assert per_node["timing"]["executor"] == {"name": "ray", "workers": 4, "shared_model": True}
    assert {k: v for k, v in per_node.items() if k != "timing"} == {k: v for k, v in per_worker.items() if k != "timing"}
    shards = sorted(p.relative_to(root_a / "shards") for p in (root_a / "shards").rglob("*.json"))
    assert len(shards) == 4
    for name in shards:  # every episode: its actions, steps and outcome
        episodes = [json.loads((root / "shards" / name).read_text())["episodes"] for root in (root_a, root_b)]
        assert episodes[0] == episodes[1]
    assert per_node["protocols"]["sample"]["methods"]["digiq"]["episodes"] == 4


def test_more_workers_than_the_cluster_has_cpus_is_one_clear_error(cluster, reference, tmp_path):
    from digiq.envs.workers import Unit
    from digiq.errors import DigiqError

    params = collect_params(reference)
    run = collection.behavior_run(params.collect, tmp_path / "out", params.gamma, BrowserConfig())
    with pytest.raises(DigiqError, match=r"workers: 6 workers need 6 CPUs on the Ray cluster .* it has 4"):
        run_units([Unit("click-button", (i,)) for i in range(6)], run, workers=6, executor="ray")


def test_without_ray_one_error_names_the_setting(tmp_path):
    script = ("import sys; sys.modules['ray'] = None\n"
              "from digiq.envs.workers import make_executor, Unit, RunConfig\n"
              "from digiq.envs.policy import PolicySpec\n"
              "from digiq.errors import DigiqError\n"
              "try:\n    make_executor('ray', 1).run([Unit('click-button', (0,))], RunConfig(PolicySpec('behavior'), 0, 1), None)\n"
              "except DigiqError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "executor 'ray' needs Ray: pip install 'digiq[ray]'" in result.stdout and "executor" in result.stdout, result.stderr


def test_the_driver_killed_and_rerun_resumes_from_committed_shards(cluster, reference, tmp_path):
    """`digiq collect --executor ray` on the cluster, SIGKILLed after its first committed shard: Ray ends its actors,
    the re-run collects only the missing shards and the dataset equals an uninterrupted run's."""
    import yaml

    nodes, _ = cluster
    out = tmp_path / "killed"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"collect": collect_section(out, executor="ray")}))
    command = [str(Path(sys.executable).parent / "digiq"), "collect", "--params", str(params)]
    env = {**os.environ, "RAY_ADDRESS": nodes.address}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("steps/*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(out.glob("steps/*.parquet")))
    assert 1 <= kept < 4 and not (out / "manifest.json").exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{4 - kept} shards collected, {kept} kept" in rerun.stdout
    assert tree_hashes(out) == tree_hashes(reference)
    assert orphan_browsers() == []  # the killed run's actors' browsers: ended by the re-run (its driver and actors)


def orphan_browsers() -> list[int]:
    """Chromium processes on a digiq profile whose owner (the worker or actor that started it) is gone: other runs'
    browsers on this machine are not ours to count."""
    import re

    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            match = re.search(rb"digiq-chromium-(\d+)-", cmdline.read_bytes())
        except OSError:
            continue
        if match and not Path(f"/proc/{int(match.group(1))}").exists():
            found.append(int(cmdline.parent.name))
    return found


def test_a_lost_node_loses_and_duplicates_nothing(cluster, reference, tmp_path):
    """(Last: it removes the cluster's second node.)"""
    nodes, worker_node = cluster
    units, run = flaky_run(reference, tmp_path / "out", tmp_path / "markers", doomed=worker_node.node_id)
    hang, done = tmp_path / "markers" / "hang", threading.Event()

    def remove_when_hung() -> None:
        while not hang.exists() and not done.is_set():
            time.sleep(0.05)
        if hang.exists():
            nodes.remove_node(worker_node, allow_graceful=False)  # the raylet and its workers, SIGKILLed

    remover = threading.Thread(target=remove_when_hung)
    remover.start()
    try:
        summaries = run_units(units, run, workers=2, executor="ray")
    finally:
        done.set()
        remover.join()
    assert hang.exists() and len(ray.nodes()) == 2 and sum(n["Alive"] for n in ray.nodes()) == 1
    assert sorted((s["task"], s["index"]) for s in summaries) == [(t, i) for t in TASKS for i in range(2)]
    assert recorded(tmp_path / "out") == recorded(reference)
