"""DVC stage `collect`: the offline dataset — π_β played in MiniWoB++ by parallel browser workers.

    DATASET/collect.json        the plan's parameters (written first; marks the folder as ours)
    DATASET/steps/<shard>.parquet
                                one shard per block of ``shard_episodes`` episodes of one task, named
                                ``<task>.e<first>-<last>.<fingerprint>``; the fingerprint hashes all
                                that changes an episode (seed, policy, noise, steps, …, and the env and
                                policy source, miniwob and Chromium versions: see code_version)
    DATASET/screenshots/…       PNG frames (content-addressed)
    collect.checks/             Great Expectations Data Docs + result.json of the raw-data suite (default data/checks/collect)
    DATASET/manifest.json       written last, only when the checks pass
    metrics/collect.json        transitions, episodes, success per task, wall time, steps/s

Resuming: shards on disk with the plan's names are kept, shards of another plan are removed, the
missing ones are collected, and screenshots no shard refers to are pruned, so an interrupted run
followed by a re-run leaves exactly the files of an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digiq.atomic import write_json
from digiq.envs.behavior import IMPATIENT, scores_with
from digiq.envs.miniwob import BrowserConfig, check_tasks
from digiq.envs.policy import PolicySpec
from digiq.envs.workers import RunConfig, Unit, run_units
from digiq.errors import DigiqError
from digiq.store import MANIFEST, SCREENSHOTS_DIR, STEP_SCHEMA, Dataset, DatasetWriter

PLAN_FILE = "collect.json"
SOURCE = "miniwob/behavior"
WEB_ACTION_KINDS = ("tap", "swipe", "type", "press_enter", "complete")  # PRESS_BACK/HOME do not exist on MiniWoB


@dataclass(frozen=True)
class CollectConfig:
    tasks: list[str]
    episodes_per_task: int
    seed: int
    workers: int
    max_steps: int
    noise: float
    out: str
    behavior: dict[str, float] = field(default_factory=lambda: dict(IMPATIENT))  # π_β's heuristic weights changed from Scores
    gamma: float = 0.5  # params.yaml's γ (the CLI without a params file uses it too)
    history: int = 1  # previous actions in the observation text (official Digi-Q: 1)
    shard_episodes: int = 10  # episodes per shard (the unit of resumption)
    time_limit_s: float = 60.0  # MiniWoB episode clock (its default, 10 s, times out slow policies)
    hang_timeout_s: float = 120.0
    success_band: tuple[float, float] = (0.2, 0.6)
    required_action_kinds: tuple[str, ...] = ("tap", "type", "press_enter")
    metrics: str = "metrics/collect.json"
    checks: str = "data/checks/collect"  # Data Docs, outside ``out``: their timestamps would change the dataset's hash

    def validate(self) -> None:
        if not self.tasks:
            raise DigiqError("no tasks given", field="collect.tasks")
        if len(set(self.tasks)) != len(self.tasks):
            raise DigiqError(f"duplicate tasks in {self.tasks}", field="collect.tasks")
        check_tasks(self.tasks, "collect.tasks")
        for name in ("episodes_per_task", "workers", "max_steps", "shard_episodes"):
            if getattr(self, name) < 1:
                raise DigiqError(f"must be at least 1, got {getattr(self, name)}", field=f"collect.{name}")
        if not 0.0 <= self.noise <= 1.0:
            raise DigiqError(f"must be in [0, 1], got {self.noise}", field="collect.noise")
        scores_with(self.behavior)
        low, high = self.success_band
        if not 0.0 <= low <= high <= 1.0:
            raise DigiqError(f"must be [low, high] inside [0, 1], got {list(self.success_band)}", field="collect.success_band")
        unknown = set(self.required_action_kinds) - set(WEB_ACTION_KINDS)
        if unknown:
            raise DigiqError(f"unknown action kind(s) {sorted(unknown)} (known: {list(WEB_ACTION_KINDS)})", field="collect.required_action_kinds")

    def episode_params(self) -> dict[str, Any]:
        """Everything that changes what an episode contains (not how many episodes, nor workers)."""
        return {
            "policy": "behavior",
            "noise": self.noise,
            "behavior": dict(sorted(self.behavior.items())),
            "seed": self.seed,
            "max_steps": self.max_steps,
            "history": self.history,
            "time_limit_s": self.time_limit_s,
            "format": 1,
            "code": code_version(),
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.episode_params(), sort_keys=True).encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """What else decides an episode's content: our env/policy code, miniwob's pages, the Chromium build."""
    import subprocess

    import miniwob

    from digiq.envs import behavior, miniwob as adapter, policy, rollout
    from digiq.envs.miniwob import BrowserConfig

    digest = hashlib.sha256()
    for module in (adapter, behavior, policy, rollout):
        digest.update(Path(module.__file__).read_bytes())
    browser = BrowserConfig()
    try:
        chromium = subprocess.run([browser.binary, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        chromium = "unknown"
    digest.update(f"miniwob {miniwob.__version__}; {chromium}; {browser.flags}".encode())
    return digest.hexdigest()[:12]


@dataclass
class CollectOutcome:
    metrics: dict[str, Any]
    checks: Any  # digiq.checks.SuiteResult
    collected_units: int
    kept_units: int
    removed_shards: list[str] = field(default_factory=list)


def plan(config: CollectConfig) -> list[Unit]:
    """The shards of this configuration: blocks of ``shard_episodes`` consecutive episodes per task."""
    fp = config.fingerprint()
    units = []
    for task in config.tasks:
        for start in range(0, config.episodes_per_task, config.shard_episodes):
            indices = tuple(range(start, min(start + config.shard_episodes, config.episodes_per_task)))
            units.append(Unit(task, indices, shard=f"{task}.e{indices[0]:05d}-{indices[-1]:05d}.{fp}"))
    return units


def run(config: CollectConfig, progress: bool = False, report: Any = None) -> CollectOutcome:
    """Collect (or finish collecting) the dataset, check it, write the manifest and metrics."""
    config.validate()
    browser = BrowserConfig(time_limit_s=config.time_limit_s)
    browser.check()
    started = time.perf_counter()
    root = Path(config.out)
    _claim_folder(root, config)
    units = plan(config)
    removed = _remove_stale_shards(root, {u.shard for u in units})
    todo = [u for u in units if not (root / "steps" / f"{u.shard}.parquet").exists()]
    collected = _collect(root, config, browser, todo, progress)
    table = _read_steps(root)
    pruned = prune_screenshots(root, table)
    df = step_frame(root, table, config.max_steps)
    from digiq.checks import run_suite

    checks = run_suite("collect_raw", df, expectations(config), docs_dir=Path(config.checks))
    metrics = collect_metrics(df, config, time.perf_counter() - started, collected, units, removed, pruned, checks.success)
    write_json(config.metrics, metrics)
    if report is not None:
        report(metrics)
    checks.raise_for_failures(root)
    DatasetWriter(root, gamma=config.gamma, source=SOURCE).finalize(
        collect=config.episode_params(), tasks=list(config.tasks), episodes_per_task=config.episodes_per_task
    )
    return CollectOutcome(metrics, checks, len(todo), len(units) - len(todo), removed)


@dataclass
class _Collected:
    units: list[Unit]
    summaries: list[dict[str, Any]]
    restarts: list[str]
    seconds: float


def _collect(root: Path, config: CollectConfig, browser: BrowserConfig, todo: list[Unit], progress: bool) -> _Collected:
    """Run the missing units on the worker pool; each writes its shard when done."""
    run_config = RunConfig(
        policy=PolicySpec("behavior", {"noise": config.noise, "scores": dict(config.behavior)}),
        seed=config.seed,
        max_steps=config.max_steps,
        history=config.history,
        browser=browser,
        dataset=str(root.resolve()),
        gamma=config.gamma,
        source=SOURCE,
        hang_timeout_s=config.hang_timeout_s,
    )
    restarts: list[str] = []
    started = time.perf_counter()
    with _Progress(progress, sum(len(u.indices) for u in todo)) as bar:
        summaries = run_units(todo, run_config, config.workers, on_step=bar.step, on_episode=bar.episode, on_restart=bar.restart(restarts))
    return _Collected(todo, summaries, restarts, time.perf_counter() - started)


# --- folder management -------------------------------------------------------------------------------


def _claim_folder(root: Path, config: CollectConfig) -> None:
    """Refuse to touch a folder that holds something other than a collection; record our plan in it."""
    plan_path = root / PLAN_FILE
    if root.exists() and any(root.iterdir()) and not plan_path.is_file():
        raise DigiqError(f"folder exists and was not written by `digiq collect` (no {PLAN_FILE}); choose another --out", file=root)
    manifest = root / MANIFEST
    if manifest.exists():  # the dataset is about to change: it is complete again only after finalize()
        manifest.unlink()
    write_json(plan_path, {**config.episode_params(), "fingerprint": config.fingerprint(), "tasks": list(config.tasks),
                           "episodes_per_task": config.episodes_per_task, "shard_episodes": config.shard_episodes})


def _remove_stale_shards(root: Path, wanted: set[str | None]) -> list[str]:
    stale = [f for f in Dataset.shard_files(root) if f.stem not in wanted]
    for file in stale:
        file.unlink()
    return sorted(f.stem for f in stale)


def _read_steps(root: Path):  # -> pyarrow.Table
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


# --- data checks -------------------------------------------------------------------------------------


def step_frame(root: Path, table: Any, max_steps: int):  # -> pandas.DataFrame
    """The step table plus the helper columns the suite checks."""
    import numpy as np

    df = table.to_pandas()
    grouped = df.groupby("traj_id")["step_id"]
    df["episode_length"] = grouped.transform("size")
    df["is_last_step"] = df["step_id"] == grouped.transform("max")
    df["reward_before_end"] = (df["reward"] > 0) & ~df["is_last_step"]
    df["steps_consecutive"] = grouped.transform(lambda s: bool((s.to_numpy() == np.arange(len(s))).all()))
    frames = {p: _frame_facts(root / p) for p in set(df["screenshot"]) | set(df["next_screenshot"].dropna())}
    df["screenshot_exists"] = df["screenshot"].map(lambda p: frames[p][0])
    df["next_screenshot_exists"] = df["next_screenshot"].map(lambda p: p is not None and frames[p][0])
    df["black_frame"] = df["screenshot"].map(lambda p: frames[p][1]) | df["next_screenshot"].map(lambda p: p is not None and frames[p][1])
    df["max_steps"] = max_steps
    return df


def _frame_facts(path: Path) -> tuple[bool, bool]:
    """(exists, all black) for one PNG."""
    import numpy as np
    from PIL import Image

    if not path.is_file():
        return False, False
    with Image.open(path) as image:
        return True, not np.asarray(image.convert("L")).any()


def expectations(config: CollectConfig) -> list[Any]:
    from digiq.checks import Expect

    low, high = config.success_band
    required = [name for name in STEP_SCHEMA.names if name not in {"next_screenshot", "next_screenshot_sha256"}]
    return [
        Expect("ExpectTableColumnsToMatchSet", {"column_set": list(STEP_SCHEMA.names), "exact_match": False},
               "the step table has every column of the step schema"),
        *[Expect("ExpectColumnValuesToNotBeNull", {"column": c}, f"{c} is never null") for c in required],
        Expect("ExpectCompoundColumnsToBeUnique", {"column_list": ["traj_id", "step_id"]}, "(traj_id, step_id) is unique"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "steps_consecutive", "value_set": [True]},
               "step ids of each trajectory are 0, 1, 2, …"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "reward", "value_set": [0.0, 1.0]}, "rewards are 0 or 1"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "reward_before_end", "value_set": [False]}, "reward only on the last step"),
        Expect("ExpectColumnPairValuesToBeEqual", {"column_A": "done", "column_B": "is_last_step"}, "done exactly on the last step of each trajectory"),
        Expect("ExpectColumnValuesToBeBetween", {"column": "mc_return", "min_value": 0.0, "max_value": 1.0}, "discounted returns in [0, 1]"),
        Expect("ExpectColumnValuesToBeBetween", {"column": "episode_length", "min_value": 1, "max_value": config.max_steps},
               f"episode lengths within 1…{config.max_steps} (max_steps)"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "screenshot_exists", "value_set": [True]}, "every screenshot file is present"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "next_screenshot_exists", "value_set": [True]}, "every next-screenshot file is present"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "black_frame", "value_set": [False]},
               "no stored frame is MiniWoB's all-black terminal frame"),
        Expect("ExpectColumnValuesToMatchRegex", {"column": "screenshot_sha256", "regex": r"^[0-9a-f]{64}$"}, "screenshot hashes are sha256 hex"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "task", "value_set": list(config.tasks)}, "only the configured tasks"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "action_kind", "value_set": list(WEB_ACTION_KINDS)},
               "only actions that exist on a web page (no press_back/press_home)"),
        Expect("ExpectColumnDistinctValuesToContainSet", {"column": "action_kind", "value_set": list(config.required_action_kinds)},
               f"action kinds {list(config.required_action_kinds)} all observed"),
        Expect("ExpectColumnMeanToBeBetween",
               {"column": "reward", "min_value": low, "max_value": high, "row_condition": "is_last_step==True", "condition_parser": "pandas"},
               f"episode success rate inside [{low:g}, {high:g}]"),
    ]


# --- metrics and progress ----------------------------------------------------------------------------


def collect_metrics(df: Any, config: CollectConfig, seconds: float, collected: _Collected, units: Sequence[Unit],
                    removed: list[str], pruned: int, checks_passed: bool) -> dict[str, Any]:
    last = df[df["is_last_step"]]
    per_task = {}
    for task in config.tasks:
        episodes = last[last["task"] == task]
        per_task[task] = {
            "episodes": int(len(episodes)),
            "transitions": int((df["task"] == task).sum()),
            "success": float(episodes["reward"].mean()) if len(episodes) else 0.0,
            "mean_length": float(episodes["episode_length"].mean()) if len(episodes) else 0.0,
        }
    todo, collect_seconds = collected.units, collected.seconds
    collected_steps = sum(e["steps"] for e in collected.summaries)
    kinds = df["action_kind"].value_counts()
    return {
        "transitions": int(len(df)),
        "episodes": int(len(last)),
        "success": float(last["reward"].mean()) if len(last) else 0.0,
        "mean_length": float(last["episode_length"].mean()) if len(last) else 0.0,
        "per_task": per_task,
        "action_kinds": {k: int(v) for k, v in sorted(kinds.items())},
        "wall_seconds": round(seconds, 2),
        "collect_seconds": round(collect_seconds, 2),
        "collected_transitions": collected_steps,
        "steps_per_second": round(collected_steps / collect_seconds, 2) if collect_seconds > 0 and collected_steps else 0.0,
        "workers": config.workers,
        "shards": {"total": len(units), "collected": len(todo), "kept": len(units) - len(todo), "removed_stale": len(removed)},
        "pruned_screenshots": pruned,
        "worker_restarts": collected.restarts,  # dead or hung workers replaced (their shard redone)
        "episode_retries": sum(e["retries"] for e in collected.summaries),  # browser restarts inside workers
        "checks_passed": checks_passed,
        "params": {**config.episode_params(), "tasks": list(config.tasks), "episodes_per_task": config.episodes_per_task},
    }


class _Progress:
    """A rich progress bar over episodes showing steps and steps/s (silent when ``enabled`` is False)."""

    def __init__(self, enabled: bool, episodes: int):
        self.enabled = enabled and episodes > 0
        self.episodes = episodes
        self.steps = 0
        self.started = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("collect"), BarColumn(), MofNCompleteColumn(), TextColumn("episodes"),
                TextColumn("{task.fields[steps]} steps · {task.fields[rate]} steps/s · {task.fields[success]} success"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task("collect", total=self.episodes, steps=0, rate="–", success="–")
            self.successes = 0
            self.done = 0
        return self

    def step(self) -> None:
        self.steps += 1
        if self.enabled and self.steps % 5 == 0:
            self._refresh()

    def episode(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            self.done += 1
            self.successes += int(summary["success"])
            self.progress.advance(self.task)
            self._refresh()

    def restart(self, log: list[str]):
        """The on_restart callback: remember the reason and show it above the bar."""

        def note(reason: str) -> None:
            log.append(reason)
            if self.enabled:
                self.progress.console.print(f"[yellow]restarted a worker[/yellow]: {reason}")

        return note

    def _refresh(self) -> None:
        rate = self.steps / max(time.perf_counter() - self.started, 1e-9)
        success = f"{self.successes / self.done:.0%}" if self.done else "–"
        self.progress.update(self.task, steps=self.steps, rate=f"{rate:.1f}", success=success)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._refresh()
            self.progress.stop()


def config_from_params(params: Any, **overrides: Any) -> CollectConfig:
    """A CollectConfig from the validated params (``collect`` section, global γ) and CLI overrides (None = keep)."""
    section = params.collect
    values = {name: getattr(section, name) for name in CollectConfig.__dataclass_fields__ if hasattr(section, name)}
    values["gamma"] = params.gamma
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("tasks",):
        values[name] = list(values[name])
    for name in ("success_band", "required_action_kinds"):
        if name in values:
            values[name] = tuple(values[name])
    return CollectConfig(**values)
