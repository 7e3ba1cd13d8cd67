"""DVC stage `collect`: the offline dataset — π_β played in MiniWoB++ by parallel browser workers.

    DATASET/collect.json        the plan's parameters (written first; marks the folder as ours)
    DATASET/steps/<shard>.parquet
                                one shard per block of ``shard_episodes`` episodes of one task, named
                                ``<task>.e<first>-<last>.<fingerprint>`` (digiq.collection)
    DATASET/screenshots/…       PNG frames (content-addressed)
    collect.checks/             Great Expectations Data Docs + result.json of the raw-data suite (default data/checks/collect)
    DATASET/manifest.json       written last, only when the checks pass
    metrics/collect.json        transitions, episodes, success per task, wall time, steps/s

A re-run resumes: finished shards are kept, stale ones removed, the missing ones collected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digiq import collection
from digiq.atomic import write_json
from digiq.collect_checks import check_steps, collect_metrics
from digiq.config import Params
from digiq.envs.miniwob import BrowserConfig
from digiq.store import DatasetWriter


@dataclass
class CollectOutcome:
    metrics: dict[str, Any]
    checks: Any  # digiq.checks.SuiteResult
    collected_units: int
    kept_units: int
    removed_shards: list[str] = field(default_factory=list)


def run(params: Params, *, progress: bool = False, report: Callable[[dict[str, Any]], None] | None = None) -> CollectOutcome:
    """Collect (or finish collecting) the dataset, check it, write the manifest and metrics.

    ``report(metrics)`` is called once the metrics exist, before failed checks raise (the CLI prints them).
    """
    section = params.collect
    browser = BrowserConfig(time_limit_s=section.time_limit_s)
    browser.check()
    started = time.perf_counter()
    root = Path(section.out)
    collection.claim_folder(root, section)
    units = collection.plan(section)
    removed = collection.remove_stale_shards(root, units)
    todo = collection.missing_units(root, units)
    run_config = collection.behavior_run(section, root, params.gamma, browser)
    collected = collection.collect_units(todo, run_config, section.workers, progress, section.executor)
    table = collection.read_steps(root)
    pruned = collection.prune_screenshots(root, table)
    df, checks = check_steps(root, table, section)
    metrics = collect_metrics(df, section, time.perf_counter() - started, collected, units, removed, pruned, checks.success)
    write_json(section.metrics, metrics)
    if report is not None:
        report(metrics)
    checks.raise_for_failures(root)
    DatasetWriter(root, gamma=params.gamma, source=collection.SOURCE).finalize(
        collect=collection.episode_params(section), tasks=list(section.tasks), episodes_per_task=section.episodes_per_task
    )
    return CollectOutcome(metrics, checks, len(todo), len(units) - len(todo), removed)
