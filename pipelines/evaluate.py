"""`digiq evaluate`: every method acts live in MiniWoB++ on seeds never used in collection.

Outputs: ``metrics/eval.json`` (per method: pooled success with a 95 % Wilson interval, mean episode length,
episodes; the same per task; timings) and ``plots/eval.csv`` (method, task, success, ci_low, ci_high, episodes).

Resume: each (method, task, block of ``episodes_per_unit`` episodes) becomes one JSON shard under
``shards/<method>/`` once all its episodes are in, written atomically; its name carries a fingerprint of
everything that changes an episode (seeds, K, noise, step cap, clock, the trained policy's files, the
feature spec), so a re-run skips finished shards and never reuses stale ones.

Seeds: episode e of task t uses ``episode_seed(seed, t, e)`` as in collect; the run refuses to start when
any evaluation seed is one of collect's (collect.seed, collect.tasks, collect.episodes_per_task).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digiq.atomic import write_json, write_text
from digiq.embed import model_hash
from digiq.envs.behavior import IMPATIENT
from digiq.envs.miniwob import BrowserConfig, check_tasks
from digiq.envs.policy import PolicySpec
from digiq.envs.rollout import episode_seed
from digiq.envs.workers import RunConfig, Unit, run_units
from digiq.errors import DigiqError
from digiq.evaluate import BASELINES, CRITIC_GREEDY, EvaluateParams, FeatureParams, summarise_method

FACTORY = "digiq.evaluate:build_eval_policy"


@dataclass(frozen=True)
class EvaluateConfig:
    """Resolved settings of one evaluation run (params.yaml's evaluate + collect sections, CLI overrides)."""

    methods: list[str]
    tasks: list[str]
    episodes: int  # per (method, task)
    seed: int
    collect_seed: int
    collect_tasks: list[str]
    collect_episodes: int
    k: int
    noise: float
    max_steps: int
    behavior: dict[str, float] = field(default_factory=lambda: dict(IMPATIENT))  # π_β's changed heuristic weights (collect.behavior)
    workers: int = 2
    history: int = 1
    time_limit_s: float = 120.0
    episodes_per_unit: int = 10
    actors: str = "models/actor"
    critic: str = "models/critic"
    features: FeatureParams = field(default_factory=FeatureParams)
    shards: str = "data/eval"
    out: str = "metrics/eval.json"
    plots: str = "plots/eval.csv"
    hang_timeout_s: float = 300.0

    @classmethod
    def from_params(cls, params: Any, **overrides: Any) -> EvaluateConfig:
        ev: EvaluateParams = getattr(params, "evaluate", None) or EvaluateParams()
        col = params.collect
        values = dict(
            methods=list(ev.methods), tasks=list(ev.tasks or col.tasks), episodes=ev.episodes_per_task, seed=ev.seed,
            collect_seed=col.seed, collect_tasks=list(col.tasks), collect_episodes=col.episodes_per_task, k=ev.k,
            noise=col.noise if ev.noise is None else ev.noise, max_steps=ev.max_steps or col.max_steps,
            behavior=dict(col.behavior), history=col.history,
            workers=ev.workers, time_limit_s=ev.time_limit_s, episodes_per_unit=ev.episodes_per_unit, actors=ev.actors, critic=ev.critic,
            features=live_features(params), shards=ev.shards, out=ev.out, plots=ev.plots,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> None:
        if not self.methods:
            raise DigiqError("no methods given", field="evaluate.methods")
        if len(set(self.methods)) != len(self.methods):
            raise DigiqError(f"methods repeat: {self.methods}", field="evaluate.methods")
        if not self.tasks:
            raise DigiqError("no tasks given", field="evaluate.tasks")
        check_tasks(self.tasks, "evaluate.tasks")
        for name in ("episodes", "workers", "max_steps", "episodes_per_unit", "k"):
            if getattr(self, name) < 1:
                raise DigiqError(f"must be at least 1, got {getattr(self, name)}", field=f"evaluate.{name}")
        for method in self.methods:
            if method not in BASELINES and not self.model_dir(method).is_dir():
                stage = "critic" if method == CRITIC_GREEDY else "actor"
                raise DigiqError(f"no trained {stage} for method {method!r} (run the {stage} stage, or drop it from evaluate.methods)",
                                 file=self.model_dir(method), field="evaluate.methods")
        check_disjoint_seeds(self)

    def model_dir(self, method: str) -> Path:
        """The trained folder that ``method`` chooses with: the critic for critic-greedy, else its policy."""
        return Path(self.critic) if method == CRITIC_GREEDY else Path(self.actors) / method


def live_features(params: Any) -> FeatureParams:
    """The embed stage's recipe for the variant the policies were trained on (``features.variant``)."""
    variant, embed = params.features.variant, params.embed
    if variant not in embed.models:
        raise DigiqError(f"no model path for variant {variant!r} in embed.models", field="features.variant")
    return FeatureParams(variant=variant, model=embed.models[variant], layer=embed.layer, pooling=embed.pooling,
                         dtype=embed.dtype, device=embed.device)


def collect_seeds(seed: int, tasks: list[str], episodes: int) -> set[int]:
    return {episode_seed(seed, t, e) for t in tasks for e in range(episodes)}


def check_disjoint_seeds(config: EvaluateConfig) -> None:
    """Refuse evaluation episodes whose environment seed was used to collect the training data."""
    used = collect_seeds(config.collect_seed, config.collect_tasks, config.collect_episodes)
    mine = collect_seeds(config.seed, config.tasks, config.episodes)
    shared = used & mine
    if config.seed == config.collect_seed or shared:
        raise DigiqError(f"evaluation seed {config.seed} reuses {len(shared) or 'all'} episode seeds of collection "
                         f"(collect.seed {config.collect_seed}); pick another evaluate.seed", field="evaluate.seed")


# ----------------------------------------------------------------------------------------------- shards


def file_digest(folder: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``folder`` (sorted)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# Bumped whenever the live candidate set changes for the same seed (shards made by another rule are not resumed).
CANDIDATE_RULE = "semantic_key/v1"  # duplicates by what they do: taps by the element under the point


def fingerprint(config: EvaluateConfig, method: str) -> str:
    """Short hash of everything that changes the episodes of ``method``."""
    parts: dict[str, Any] = {"seed": config.seed, "k": config.k, "noise": config.noise, "max_steps": config.max_steps,
                             "behavior": config.behavior,
                             "history": config.history, "time_limit_s": config.time_limit_s, "method": method,
                             "candidate_rule": CANDIDATE_RULE}
    if method not in BASELINES:
        parts["actor"] = file_digest(config.model_dir(method))
        parts["features"] = config.features.model_dump()
        parts["model"] = model_hash(config.features.model)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def units_of(config: EvaluateConfig) -> list[Unit]:
    n, block = config.episodes, config.episodes_per_unit
    return [Unit(task, tuple(range(start, min(start + block, n)))) for task in config.tasks for start in range(0, n, block)]


def shard_path(config: EvaluateConfig, method: str, unit: Unit, fp: str) -> Path:
    return Path(config.shards) / method / f"{unit.task}.e{unit.indices[0]:05d}-{unit.indices[-1]:05d}.{fp}.json"


def read_shard(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DigiqError(f"unreadable result shard ({exc}); delete it to re-run its episodes", file=path) from None


class _ShardWriter:
    """Collects episode summaries from the workers and writes a unit's shard once all of its episodes are in."""

    def __init__(self, config: EvaluateConfig, method: str, units: list[Unit], fp: str, advance: Any):
        self.config, self.method, self.fp, self.advance = config, method, fp, advance
        self.unit_of = {(u.task, i): u for u in units for i in u.indices}
        self.got: dict[Unit, dict[int, dict[str, Any]]] = {u: {} for u in units}
        self.started = time.perf_counter()

    def __call__(self, summary: dict[str, Any]) -> None:
        unit = self.unit_of[(summary["task"], summary["index"])]
        fresh = summary["index"] not in self.got[unit]
        self.got[unit][summary["index"]] = summary
        if fresh:
            self.advance()
        if len(self.got[unit]) == len(unit.indices):
            episodes = [self.got[unit][i] for i in unit.indices]
            write_json(shard_path(self.config, self.method, unit, self.fp),
                       {"method": self.method, "task": unit.task, "fingerprint": self.fp,
                        "seconds": round(time.perf_counter() - self.started, 3), "episodes": episodes})
            self.started = time.perf_counter()


# ----------------------------------------------------------------------------------------------- run


def policy_spec(config: EvaluateConfig, method: str) -> PolicySpec:
    kwargs: dict[str, Any] = {"method": method, "k": config.k, "noise": config.noise, "behavior": dict(config.behavior)}
    if method not in BASELINES:
        kwargs.update(actor_dir=str(config.model_dir(method)), features=config.features.model_dump(), threads=1)
    return PolicySpec(FACTORY, kwargs)


def run(config: EvaluateConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate every method (resuming from finished shards); write eval.json and the plot CSV; return the metrics."""
    config.validate()
    browser = BrowserConfig(time_limit_s=config.time_limit_s)
    browser.check()
    units = units_of(config)
    fps = {m: fingerprint(config, m) for m in config.methods}
    todo = {m: [u for u in units if not shard_path(config, m, u, fps[m]).exists()] for m in config.methods}
    total = len(config.methods) * len(config.tasks) * config.episodes
    done = total - sum(len(u.indices) for m in config.methods for u in todo[m])
    timing: dict[str, dict[str, float]] = {}
    with _bar(progress, total, done) as advance:
        for method in config.methods:
            if not todo[method]:
                continue
            run_config = RunConfig(policy=policy_spec(config, method), seed=config.seed, max_steps=config.max_steps,
                                   history=config.history, browser=browser, hang_timeout_s=config.hang_timeout_s)
            started = time.perf_counter()
            episodes = run_units(todo[method], run_config, config.workers,
                                 on_episode=_ShardWriter(config, method, todo[method], fps[method], advance))
            seconds = time.perf_counter() - started
            steps = sum(e["steps"] for e in episodes)
            timing[method] = {"seconds": round(seconds, 2), "episodes": len(episodes), "steps": steps,
                              "seconds_per_episode": round(seconds / max(len(episodes), 1), 3),
                              "steps_per_second": round(steps / seconds, 2) if seconds > 0 else 0.0}
    metrics = summarise(config, units, fps, timing)
    write_json(config.out, metrics)
    write_text(config.plots, plot_rows(metrics))
    return metrics


def load_episodes(config: EvaluateConfig, method: str, units: list[Unit], fp: str) -> list[dict[str, Any]]:
    episodes: list[dict[str, Any]] = []
    for unit in units:
        path = shard_path(config, method, unit, fp)
        if not path.exists():
            raise DigiqError("result shard missing after the run", file=path)
        episodes.extend(read_shard(path)["episodes"])
    return episodes


def summarise(config: EvaluateConfig, units: list[Unit], fps: dict[str, str], timing: dict[str, Any]) -> dict[str, Any]:
    methods = {m: summarise_method(load_episodes(config, m, units, fps[m]), config.tasks) for m in config.methods}
    return {
        "methods": methods,
        "tasks": config.tasks,
        "episodes_per_task": config.episodes,
        "seed": config.seed,
        "k": config.k,
        "noise": config.noise,
        "behavior": dict(config.behavior),
        "max_steps": config.max_steps,
        "time_limit_s": config.time_limit_s,
        "timing": {"this_run": timing, "estimate": wall_time_estimate(config, timing)},
    }


def wall_time_estimate(config: EvaluateConfig, timing: dict[str, Any]) -> dict[str, Any]:
    """Seconds per episode measured in this run (per method), scaled to the configured episode count."""
    per_method = {m: t["seconds_per_episode"] * len(config.tasks) * config.episodes for m, t in timing.items() if t["episodes"]}
    return {"seconds_per_method": {m: round(s, 1) for m, s in per_method.items()},
            "note": "measured seconds/episode (with this run's worker count) × tasks × episodes_per_task"}


def plot_rows(metrics: dict[str, Any]) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["method", "task", "success", "ci_low", "ci_high", "episodes"])
    for method, m in metrics["methods"].items():
        for task, t in [*m["per_task"].items(), ("all", m)]:
            out.writerow([method, task, round(t["success"], 4), t["ci95"][0], t["ci95"][1], t["episodes"]])
    return buf.getvalue()


class _bar:
    """A rich progress bar over episodes (no-op when disabled); yields the per-episode callback."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TextColumn("episodes"),
                                 TimeElapsedColumn(), TimeRemainingColumn())
        self.progress.start()
        task = self.progress.add_task("evaluate", total=self.total, completed=self.done)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.stop()
