"""Policies played in MiniWoB++ by parallel browser workers: the offline dataset, and online rollouts.

A collection is planned as shards, blocks of ``shard_episodes`` episodes of one task, named
``<task>.e<first>-<last>.<fingerprint>``; the fingerprint hashes all that changes an episode (seed, policy,
noise, steps, …, and the env and policy source, miniwob and Chromium versions: see code_version).

Resuming: shards on disk with the plan's names are kept, shards of another plan are removed, the missing
ones are collected, and screenshots no shard refers to are pruned, so an interrupted run followed by a
re-run leaves exactly the files of an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digiq.atomic import write_json
from digiq.config import CollectParams
from digiq.envs.miniwob import BrowserConfig
from digiq.envs.policy import PolicySpec
from digiq.envs.workers import Recording, RunConfig, Unit, episode_blocks, run_units
from digiq.errors import DigiqError
from digiq.progress import Bar, progress_bar
from digiq.store import MANIFEST, SCREENSHOTS_DIR, STEP_SCHEMA, Dataset

PLAN_FILE = "collect.json"
# modules of digiq/envs that decide where and how episodes run, not what they contain (tests/test_ray.py: the same
# shards from every executor; tests/test_evaluate.py: the same episodes with and without replay): changing them
# keeps a collection's shards
EXECUTION_ONLY = ("workers.py", "local_pool.py", "replay.py", "browser_cleanup.py")
SOURCE = "miniwob/behavior"


# --- the plan ------------------------------------------------------------------------------------------


def episode_params(section: CollectParams) -> dict[str, Any]:
    """Everything that changes what an episode contains (not how many episodes, nor workers)."""
    return {
        "policy": "behavior",
        "noise": section.noise,
        "behavior": dict(sorted(section.behavior.items())),
        "seed": section.seed,
        "max_steps": section.max_steps,
        "history": section.history,
        "time_limit_s": section.time_limit_s,
        "format": 1,
        "code": code_version(),
    }


def fingerprint(section: CollectParams) -> str:
    return hashlib.sha256(json.dumps(episode_params(section), sort_keys=True).encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """What else decides an episode's content: our env/policy code, miniwob's pages, the Chromium build."""
    import subprocess

    import miniwob

    from digiq import envs

    digest = hashlib.sha256()
    for module in sorted(Path(envs.__file__).parent.glob("*.py")):  # the adapter, π_β, views, rollouts
        if module.name not in EXECUTION_ONLY:
            digest.update(module.read_bytes())
    browser = BrowserConfig()
    try:
        chromium = subprocess.run([browser.binary, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        chromium = "unknown"
    digest.update(f"miniwob {miniwob.__version__}; {chromium}; {browser.flags}".encode())
    return digest.hexdigest()[:12]


def plan(section: CollectParams) -> list[Unit]:
    """The shards of this configuration: blocks of ``shard_episodes`` consecutive episodes per task."""
    fp = fingerprint(section)
    return [
        Unit(task, block, shard=f"{task}.e{block[0]:05d}-{block[-1]:05d}.{fp}")
        for task in section.tasks
        for block in episode_blocks(section.episodes_per_task, section.shard_episodes)
    ]


def plan_record(section: CollectParams) -> dict[str, Any]:
    """The plan as recorded in the dataset folder (``collect.json``)."""
    return {**episode_params(section), "fingerprint": fingerprint(section), "tasks": list(section.tasks),
            "episodes_per_task": section.episodes_per_task, "shard_episodes": section.shard_episodes}


# --- the dataset folder --------------------------------------------------------------------------------


def claim_folder(root: Path, section: CollectParams) -> None:
    """Refuse to touch a folder that holds something other than a collection; record our plan in it."""
    plan_path = root / PLAN_FILE
    if root.exists() and any(root.iterdir()) and not plan_path.is_file():
        raise DigiqError(f"folder exists and was not written by `digiq collect` (no {PLAN_FILE}); choose another --out", file=root)
    manifest = root / MANIFEST
    if manifest.exists():  # the dataset is about to change: it is complete again only after finalize()
        manifest.unlink()
    write_json(plan_path, plan_record(section))


def remove_stale_shards(root: Path, units: list[Unit]) -> list[str]:
    """Delete the shards on disk that are not in the plan; returns their names."""
    wanted = {u.shard for u in units}
    stale = [f for f in Dataset.shard_files(root) if f.stem not in wanted]
    for file in stale:
        file.unlink()
    return sorted(f.stem for f in stale)


def missing_units(root: Path, units: list[Unit]) -> list[Unit]:
    """The planned units whose shard is not on disk yet."""
    return [u for u in units if not (root / "steps" / f"{u.shard}.parquet").exists()]


def read_steps(root: Path):  # -> pyarrow.Table
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = Dataset.shard_files(root)
    if not files:
        raise DigiqError("no shards were written", file=root / "steps")
    table = pa.concat_tables([pq.read_table(f).select(STEP_SCHEMA.names).cast(STEP_SCHEMA) for f in files])
    return table.sort_by([("traj_id", "ascending"), ("step_id", "ascending")])


def prune_screenshots(root: Path, table: Any) -> int:
    """Delete PNG files no step refers to (left by episodes of an interrupted run or a removed shard), and the
    temporary files of screenshot writes a kill interrupted (every writer has finished when this runs)."""
    referenced = set(table.column("screenshot").to_pylist()) | set(table.column("next_screenshot").to_pylist())
    removed = 0
    for path in (root / SCREENSHOTS_DIR).glob("*/*.png"):
        if path.relative_to(root).as_posix() not in referenced:
            path.unlink()
            removed += 1
    for path in (root / SCREENSHOTS_DIR).glob("*/.*.png.*.tmp"):
        path.unlink()
    return removed


# --- running the workers -------------------------------------------------------------------------------


@dataclass
class Collected:
    """What the workers did in this run: the units collected, their episode summaries, worker restarts."""

    units: list[Unit]
    summaries: list[dict[str, Any]]
    restarts: list[str]
    seconds: float


def behavior_run(section: CollectParams, root: Path, gamma: float, browser: BrowserConfig) -> RunConfig:
    """π_β with the section's noise and heuristic weights, recording its episodes into ``root``."""
    return RunConfig(
        policy=PolicySpec("behavior", {"noise": section.noise, "scores": dict(section.behavior)}),
        seed=section.seed,
        max_steps=section.max_steps,
        history=section.history,
        browser=browser,
        record=Recording(str(root.resolve()), gamma, SOURCE),
        hang_timeout_s=section.hang_timeout_s,
    )


def collect_units(todo: list[Unit], run: RunConfig, workers: int, progress: bool = False, executor: str = "local") -> Collected:
    """Run the missing units on ``workers`` browsers of ``executor``; the driver commits each shard when it is done."""
    started = time.perf_counter()
    episodes = sum(len(u.indices) for u in todo)
    status = "{steps} steps · {rate} steps/s · {success} success"
    with progress_bar("collect", episodes, enabled=progress and episodes > 0, unit="episodes", status=status,
                      transient=False, steps=0, rate="–", success="–") as bar:
        feed = _EpisodeFeed(bar, show_restarts=progress)
        summaries = run_units(todo, run, workers, on_step=feed.step, on_episode=feed.episode, on_restart=feed.restart,
                              executor=executor)
        feed.refresh()
    return Collected(todo, summaries, feed.restarts, time.perf_counter() - started)


class _EpisodeFeed:
    """Feeds the collect bar (steps, steps/s, success so far) from the workers' events; notes worker restarts."""

    def __init__(self, bar: Bar, show_restarts: bool):
        self.bar, self.show_restarts = bar, show_restarts
        self.steps = self.episodes = self.successes = 0
        self.restarts: list[str] = []
        self.started = time.perf_counter()

    def step(self) -> None:
        self.steps += 1
        if self.steps % 5 == 0:
            self.refresh()

    def episode(self, summary: dict[str, Any]) -> None:
        self.episodes += 1
        self.successes += int(summary["success"])
        self.bar.advance(1, **self._fields())

    def restart(self, reason: str) -> None:
        self.restarts.append(reason)
        if self.show_restarts:
            from rich import get_console

            get_console().print(f"[yellow]restarted a worker[/yellow]: {reason}")

    def refresh(self) -> None:
        self.bar.update(**self._fields())

    def _fields(self) -> dict[str, Any]:
        rate = self.steps / max(time.perf_counter() - self.started, 1e-9)
        success = f"{self.successes / self.episodes:.0%}" if self.episodes else "–"
        return {"steps": self.steps, "rate": f"{rate:.1f}", "success": success}


# --- online rollouts -----------------------------------------------------------------------------------


@dataclass
class RolloutResult:
    per_task: dict[str, dict[str, float]]
    success: float
    episodes: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "per_task": self.per_task,
            "episodes": len(self.episodes),
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "steps_per_second": round(self.steps / self.seconds, 2) if self.seconds > 0 else 0.0,
        }


def roll_out(policy: PolicySpec, section: CollectParams, *, episodes: int, seed: int, progress: bool = False) -> RolloutResult:
    """``episodes`` episodes per task of ``policy``, with the section's tasks, workers and episode settings; nothing
    is recorded. Episode seeds are derived from (seed, task, episode), as in a collection."""
    if episodes < 1:
        raise DigiqError(f"must be at least 1, got {episodes}", field="episodes")
    policy.build()  # fail here, with one clear message, rather than in every worker
    browser = BrowserConfig(time_limit_s=section.time_limit_s)
    browser.check()
    units = [Unit(task, block) for task in section.tasks for block in episode_blocks(episodes, section.shard_episodes)]
    run = RunConfig(policy=policy, seed=seed, max_steps=section.max_steps, history=section.history, browser=browser,
                    hang_timeout_s=section.hang_timeout_s)
    started = time.perf_counter()
    with progress_bar("rollout", episodes * len(section.tasks), enabled=progress, unit="episodes", transient=False) as bar:
        summaries = run_units(units, run, section.workers, on_episode=lambda summary: bar.advance(), executor=section.executor)
    return summarise(summaries, list(section.tasks), time.perf_counter() - started)


def summarise(episodes: list[dict[str, Any]], tasks: list[str], seconds: float) -> RolloutResult:
    per_task = {}
    for task in tasks:
        mine = [e for e in episodes if e["task"] == task]
        n = max(len(mine), 1)
        per_task[task] = {
            "episodes": len(mine),
            "success": sum(e["success"] for e in mine) / n,
            "mean_steps": sum(e["steps"] for e in mine) / n,
            "timed_out": sum(e["timed_out"] for e in mine),
            "step_cap": sum(not e["terminated"] for e in mine),
        }
    overall = sum(v["success"] for v in per_task.values()) / max(len(per_task), 1)
    return RolloutResult(per_task, overall, episodes, seconds, sum(e["steps"] for e in episodes))
