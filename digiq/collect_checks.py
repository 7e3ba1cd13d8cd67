"""The raw-data suite of a collection (Great Expectations) and the collect metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from digiq.collection import Collected, episode_params
from digiq.config import WEB_ACTION_KINDS, CollectParams
from digiq.envs.workers import Unit
from digiq.store import STEP_SCHEMA


def check_steps(root: Path, table: Any, section: CollectParams) -> tuple[Any, Any]:
    """The step table with the suite's helper columns, and the suite's result (Data Docs in ``section.checks``)."""
    from digiq.checks import run_suite

    df = step_frame(root, table, section.max_steps)
    return df, run_suite("collect_raw", df, expectations(section), docs_dir=Path(section.checks))


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


def expectations(section: CollectParams) -> list[Any]:
    from digiq.checks import Expect

    low, high = section.success_band
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
        Expect("ExpectColumnValuesToBeBetween", {"column": "episode_length", "min_value": 1, "max_value": section.max_steps},
               f"episode lengths within 1…{section.max_steps} (max_steps)"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "screenshot_exists", "value_set": [True]}, "every screenshot file is present"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "next_screenshot_exists", "value_set": [True]}, "every next-screenshot file is present"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "black_frame", "value_set": [False]},
               "no stored frame is MiniWoB's all-black terminal frame"),
        Expect("ExpectColumnValuesToMatchRegex", {"column": "screenshot_sha256", "regex": r"^[0-9a-f]{64}$"}, "screenshot hashes are sha256 hex"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "task", "value_set": list(section.tasks)}, "only the configured tasks"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "action_kind", "value_set": list(WEB_ACTION_KINDS)},
               "only actions that exist on a web page (no press_back/press_home)"),
        Expect("ExpectColumnDistinctValuesToContainSet", {"column": "action_kind", "value_set": list(section.required_action_kinds)},
               f"action kinds {list(section.required_action_kinds)} all observed"),
        Expect("ExpectColumnMeanToBeBetween",
               {"column": "reward", "min_value": low, "max_value": high, "row_condition": "is_last_step==True", "condition_parser": "pandas"},
               f"episode success rate inside [{low:g}, {high:g}]"),
    ]


def collect_metrics(df: Any, section: CollectParams, seconds: float, collected: Collected, units: Sequence[Unit],
                    removed: list[str], pruned: int, checks_passed: bool) -> dict[str, Any]:
    """metrics/collect.json: size and success per task, action kinds, timings, what resuming kept and redid."""
    last = df[df["is_last_step"]]
    per_task = {}
    for task in section.tasks:
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
        "workers": section.workers,
        "shards": {"total": len(units), "collected": len(todo), "kept": len(units) - len(todo), "removed_stale": len(removed)},
        "pruned_screenshots": pruned,
        "worker_restarts": collected.restarts,  # dead or hung workers replaced (their shard redone)
        "episode_retries": sum(e["retries"] for e in collected.summaries),  # browser restarts inside workers
        "checks_passed": checks_passed,
        "params": {**episode_params(section), "tasks": list(section.tasks), "episodes_per_task": section.episodes_per_task},
    }
