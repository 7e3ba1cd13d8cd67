"""`digiq rollout`: run any policy online in MiniWoB++ and report success per task.

The policy is a :class:`~digiq.envs.policy.PolicySpec` — a registered name ("behavior") or
``package.module:factory`` with keyword arguments — built inside each worker process, so trained
policies plug in without touching this module. Episode seeds are derived from (seed, task, episode),
exactly as in `collect`; use a seed the training data was not collected with to evaluate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digiq.atomic import write_json
from digiq.envs.miniwob import BrowserConfig, check_tasks
from digiq.envs.policy import PolicySpec
from digiq.envs.workers import RunConfig, Unit, run_units
from digiq.errors import DigiqError


@dataclass(frozen=True)
class RolloutConfig:
    policy: PolicySpec
    tasks: list[str]
    episodes: int  # per task
    seed: int
    workers: int = 2
    max_steps: int = 8
    history: int = 1
    time_limit_s: float = 60.0
    episodes_per_unit: int = 10
    hang_timeout_s: float = 120.0

    def validate(self) -> None:
        if not self.tasks:
            raise DigiqError("no tasks given", field="tasks")
        check_tasks(self.tasks, "tasks")
        for name in ("episodes", "workers", "max_steps", "episodes_per_unit"):
            if getattr(self, name) < 1:
                raise DigiqError(f"must be at least 1, got {getattr(self, name)}", field=name)


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


def run(config: RolloutConfig, progress: bool = False, out: str | Path | None = None) -> RolloutResult:
    config.validate()
    config.policy.build()  # fail here, with one clear message, rather than in every worker
    browser = BrowserConfig(time_limit_s=config.time_limit_s)
    browser.check()
    units = [
        Unit(task, tuple(range(start, min(start + config.episodes_per_unit, config.episodes))))
        for task in config.tasks
        for start in range(0, config.episodes, config.episodes_per_unit)
    ]
    run_config = RunConfig(policy=config.policy, seed=config.seed, max_steps=config.max_steps, history=config.history,
                           browser=browser, hang_timeout_s=config.hang_timeout_s)
    started = time.perf_counter()
    with _bar(progress, config.episodes * len(config.tasks)) as advance:
        episodes = run_units(units, run_config, config.workers, on_episode=advance)
    result = summarise(episodes, config.tasks, time.perf_counter() - started)
    if out is not None:
        write_json(out, {**result.to_json(), "policy": {"name": config.policy.name, "kwargs": config.policy.kwargs},
                         "seed": config.seed, "max_steps": config.max_steps, "episodes_per_task": config.episodes})
    return result


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


class _bar:
    """A rich progress bar over episodes (a no-op when disabled); yields the per-episode callback."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda summary: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("rollout"), BarColumn(), MofNCompleteColumn(), TextColumn("episodes"), TimeElapsedColumn())
        self.progress.start()
        task = self.progress.add_task("rollout", total=self.total)
        return lambda summary: self.progress.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.stop()
