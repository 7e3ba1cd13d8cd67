"""What is in a dataset: summaries for `digiq data stats` and `digiq data show`, as DuckDB queries.

A trajectory succeeds when any of its steps has a positive reward (Trajectory.success).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from digiq.actions import describe_action
from digiq.errors import DigiqError
from digiq.store import Dataset

TRAJECTORIES_SQL = """
    SELECT traj_id, any_value(task) AS task, count(*) AS steps, max(reward) > 0 AS success
    FROM steps GROUP BY traj_id
"""
TOTALS_SQL = f"""
    SELECT count(*) AS trajectories, coalesce(sum(steps), 0) AS steps,
           avg(success::DOUBLE) AS success_rate, avg(steps) AS mean_length
    FROM ({TRAJECTORIES_SQL})
"""
PER_TASK_SQL = f"""
    SELECT task, count(*) AS trajectories, sum(steps) AS steps,
           avg(success::DOUBLE) AS success_rate, avg(steps) AS mean_length
    FROM ({TRAJECTORIES_SQL}) GROUP BY task ORDER BY task
"""
ACTION_KINDS_SQL = "SELECT task, action_kind, count(*) AS n FROM steps GROUP BY task, action_kind"
STEPS_SQL = """
    SELECT step_id, task, goal, action, reward, done, mc_return, screenshot, next_screenshot
    FROM steps WHERE traj_id = ? ORDER BY step_id
"""
CANDIDATE_COUNTS_SQL = "SELECT step_id, count(*) AS n FROM candidates WHERE traj_id = ? GROUP BY step_id"


class TaskStats(BaseModel):
    task: str
    trajectories: int
    steps: int
    success_rate: float | None
    mean_length: float | None
    action_kinds: dict[str, int]


class DatasetStats(BaseModel):
    path: str
    source: str | None
    gamma: float
    trajectories: int
    steps: int
    success_rate: float | None  # None for an empty dataset
    mean_length: float | None
    action_kinds: dict[str, int]  # by Action.kind, most frequent first
    tasks: list[TaskStats]
    tables: dict[str, int]  # extra tables next to the step table (candidates, precomputed, …) -> rows


class StepView(BaseModel):
    step_id: int
    action: str
    description: str
    reward: float
    done: bool
    mc_return: float
    screenshot: str
    next_screenshot: str | None
    candidates: int | None  # rows in candidates.parquet for this step, when the dataset has it


class TrajectoryView(BaseModel):
    traj_id: str
    task: str
    goal: str
    success: bool
    total_reward: float
    steps: list[StepView]


def dataset_stats(dataset: Dataset) -> DatasetStats:
    con = dataset.connect()
    totals = _records(con, TOTALS_SQL)[0]
    kinds: dict[str, dict[str, int]] = {}
    for row in _records(con, ACTION_KINDS_SQL):
        kinds.setdefault(row["task"], {})[row["action_kind"]] = int(row["n"])
    tasks = [
        TaskStats(**_numbers(row), action_kinds=_most_frequent_first(kinds.get(row["task"], {})))
        for row in _records(con, PER_TASK_SQL)
    ]
    overall: dict[str, int] = {}
    for per_task in kinds.values():
        for kind, n in per_task.items():
            overall[kind] = overall.get(kind, 0) + n
    return DatasetStats(
        path=str(dataset.root),
        source=dataset.manifest.get("source"),
        gamma=dataset.gamma,
        **_numbers(totals),
        action_kinds=_most_frequent_first(overall),
        tasks=tasks,
        tables={name: int(con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]) for name in extra_tables(dataset)},
    )


def trajectory_view(dataset: Dataset, traj_id: str) -> TrajectoryView:
    con = dataset.connect()
    rows = _records(con, STEPS_SQL, [traj_id])
    if not rows:
        raise DigiqError(f"no trajectory {traj_id!r}{_suggest(dataset, traj_id)}", file=dataset.root, field="traj")
    counts = None
    if "candidates" in extra_tables(dataset):
        counts = {int(r["step_id"]): int(r["n"]) for r in _records(con, CANDIDATE_COUNTS_SQL, [traj_id])}
    steps = [
        StepView(
            step_id=int(row["step_id"]),
            action=row["action"],
            description=describe_action(dataset.action({**row, "traj_id": traj_id})),
            reward=float(row["reward"]),
            done=bool(row["done"]),
            mc_return=float(row["mc_return"]),
            screenshot=str(dataset.image_path(row["screenshot"])),
            next_screenshot=str(dataset.image_path(row["next_screenshot"])) if row["next_screenshot"] else None,
            candidates=None if counts is None else counts.get(int(row["step_id"]), 0),
        )
        for row in rows
    ]
    return TrajectoryView(
        traj_id=traj_id,
        task=rows[0]["task"],
        goal=rows[0]["goal"],
        success=any(step.reward > 0 for step in steps),
        total_reward=sum(step.reward for step in steps),
        steps=steps,
    )


def extra_tables(dataset: Dataset) -> list[str]:
    """Names of the DuckDB views Dataset.connect() makes from the dataset's top-level Parquet files."""
    return [path.stem for path in sorted(Path(dataset.root).glob("*.parquet"))]


def _records(con: Any, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    """DuckDB aggregates (HUGEINT, DECIMAL, None on empty input) as plain ints and floats."""
    out = dict(row)
    for name in ("trajectories", "steps"):
        out[name] = int(row[name] or 0)
    for name in ("success_rate", "mean_length"):
        out[name] = None if row[name] is None else float(row[name])
    return out


def _most_frequent_first(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _suggest(dataset: Dataset, traj_id: str) -> str:
    ids = dataset.trajectory_ids()
    if not ids:
        return " (the dataset is empty)"
    close = difflib.get_close_matches(traj_id, ids, n=3)
    return f" ({len(ids)} in the dataset; {'did you mean' if close else 'e.g.'} {', '.join(close or ids[:3])})"
