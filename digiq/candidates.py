"""Candidate actions: K actions per state from the behaviour policy π_β, index 0 = the dataset action.

    table = make_candidates(Dataset("data/raw"), k=64, seed=0)     # CANDIDATES_SCHEMA, one row per candidate
    summary = diversity(table)                                       # distinct actions per state
    check_diversity(table, min_mean_distinct=4, min_frac_two_distinct=0.9).raise_for_failures(path)

Sampling (Digi-Q samples K actions from π_β at every stored state, duplicates included):

- candidate 0 is the dataset action (its stored string, unchanged); candidates 1..K−1 are K−1 independent
  draws ``π_β.sample(step, K − 1, rng)`` at the stored state (goal + DOM elements + previous actions);
- ``rng`` is seeded per state from ``(seed, traj_id, step_id)`` (a SeedSequence over a sha256 of the key),
  so a state's candidates do not depend on which other states are sampled or in which order;
- duplicates are kept as sampled; ``is_duplicate`` marks a candidate whose canonical action string equals
  an earlier candidate of the same state, so ``n_distinct = K − Σ is_duplicate``.

Imported official data (a dataset with its own ``candidates.parquet``, written by the importer from
``action_list``) keeps its candidates: :func:`make_candidates` reads them and only adds ``is_duplicate``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digiq.actions import format_action, parse_action
from digiq.errors import DigiqError

if TYPE_CHECKING:
    from digiq.checks import SuiteResult
    from digiq.envs.behavior import BehaviorPolicy
    from digiq.store import Dataset

IMPORTED_FILE = "candidates.parquet"  # written by digiq.importer next to manifest.json
CANDIDATES_SCHEMA = pa.schema([
    ("traj_id", pa.string()),
    ("step_id", pa.int32()),
    ("cand_idx", pa.int32()),
    ("action", pa.string()),
    ("is_duplicate", pa.bool_()),
])


def state_rng(seed: int, traj_id: str, step_id: int) -> np.random.Generator:
    """The generator of one state: a function of (seed, traj_id, step_id) only."""
    digest = hashlib.sha256(f"{traj_id}/{int(step_id)}".encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words]))


def canonical(action: str) -> str:
    """The canonical AutoUI string of an action (what duplicates are compared on)."""
    return format_action(parse_action(action))


def semantic_key(action: Any, elements: list[dict[str, Any]] | None) -> str:
    """What an action *does*, for de-duplicating candidates: a tap is the innermost tappable DOM element under its
    point (``tap@<ref>``, ``tap@none`` off every control); any other action is its canonical string.

    π_β jitters every tap inside its element, so as strings no two taps are ever equal, while a TYPE or PRESS_ENTER
    drawn 20 times collapses to one candidate. De-duplicating by string therefore hands each discrete action the
    whole mass of its copies and splits a tap's mass over its jittered copies: imitation over such a set (bc)
    learns "pick the most-repeated string" (TYPE / ENTER / COMPLETE), not π_β's choice. Without elements
    (imported data) this is the canonical string.
    """
    from digiq.envs.behavior import tapped_element

    a = parse_action(action) if isinstance(action, str) else action
    if a.kind != "tap" or not elements:
        return format_action(a)
    hit = tapped_element(a.touch_point, elements)
    return f"tap@{hit['ref'] if hit is not None else 'none'}"


def key_classes(keys: Iterable[Hashable]) -> dict[Hashable, tuple[int, int]]:
    """Group a sequence by key, in first-occurrence order: key → (position of its first item, items sharing it).
    One rule for training (:func:`digiq.pipelines.critic.candidate_classes`) and live evaluation
    (:func:`digiq.evaluate.candidate_set`): the first draw of a class stands for all its draws."""
    classes: dict[Hashable, tuple[int, int]] = {}
    for position, key in enumerate(keys):
        first, count = classes.get(key, (position, 0))
        classes[key] = (first, count + 1)
    return classes


def duplicate_flags(actions: Iterable[str]) -> list[bool]:
    """True for each action equal (canonically) to an earlier one of the same list."""
    seen: set[str] = set()
    flags = []
    for action in actions:
        key = canonical(action)
        flags.append(key in seen)
        seen.add(key)
    return flags


def sample_state(policy: BehaviorPolicy, row: dict[str, Any], k: int, seed: int) -> list[str]:
    """K candidate action strings for one step-table row: [dataset action] + K − 1 draws from π_β."""
    from digiq.envs.view import StepView

    if k < 1:
        raise DigiqError(f"must be ≥ 1, got {k}", field="k")
    rng = state_rng(seed, row["traj_id"], row["step_id"])
    try:
        view = StepView.from_row(row)
    except DigiqError as exc:
        raise DigiqError(f"{exc.message} (state {row['traj_id']}/{row['step_id']})", field=exc.field or "elements") from None
    drawn = policy.sample(view, k - 1, rng) if k > 1 else []
    return [row["action"], *(format_action(a) for a in drawn)]


def make_candidates(dataset: Dataset, k: int, seed: int, *, policy: BehaviorPolicy | None = None,
                    progress: bool = False) -> pa.Table:
    """The candidate table of ``dataset`` (imported ``candidates.parquet`` when the dataset has one)."""
    imported = Path(dataset.root) / IMPORTED_FILE
    if imported.is_file():
        return read_imported(imported, dataset)
    from digiq.envs.behavior import BehaviorPolicy

    policy = policy or BehaviorPolicy()
    columns = ["traj_id", "step_id", "task", "goal", "observation", "elements", "action"]
    rows = dataset.table().select(columns).to_pylist()
    traj, step, idx, actions, dup = [], [], [], [], []
    for row in _progress(rows, "candidates", progress):
        cands = sample_state(policy, row, k, seed)
        traj += [row["traj_id"]] * len(cands)
        step += [row["step_id"]] * len(cands)
        idx += range(len(cands))
        actions += cands
        dup += duplicate_flags(cands)
    return pa.table([traj, step, idx, actions, dup], schema=CANDIDATES_SCHEMA)


def read_imported(path: Path, dataset: Dataset) -> pa.Table:
    """An importer-written candidate table (traj_id, step_id, cand_idx, action) with ``is_duplicate`` added."""
    from digiq.parquet import read_table

    table = read_table(path, columns=["traj_id", "step_id", "cand_idx", "action"])
    table = table.sort_by([("traj_id", "ascending"), ("step_id", "ascending"), ("cand_idx", "ascending")])
    frame = table.to_pandas()
    try:
        frame["is_duplicate"] = frame.groupby(["traj_id", "step_id"], sort=False)["action"].transform(
            lambda actions: duplicate_flags(actions.tolist()))
    except DigiqError:
        raise _unparsable_candidate(frame, path) from None
    steps = dataset.table().select(["traj_id", "step_id", "action"]).to_pandas()
    merged = steps.merge(frame[frame["cand_idx"] == 0], on=["traj_id", "step_id"], how="left", suffixes=("", "_c"))
    missing = merged[merged["action_c"].isna()]
    if len(missing):
        first = missing.iloc[0]
        raise DigiqError(f"state {first.traj_id}/{first.step_id} has no candidate 0 ({len(missing)} states)",
                         file=path, field="cand_idx")
    return pa.Table.from_pandas(frame, schema=CANDIDATES_SCHEMA, preserve_index=False)


def _unparsable_candidate(frame: Any, path: Path) -> DigiqError:
    """The first candidate of an imported table whose action string does not parse, as a DigiqError."""
    for row in frame.drop_duplicates("action").itertuples():
        try:
            parse_action(row.action)
        except DigiqError as exc:
            return DigiqError(f"state {row.traj_id}/{row.step_id} candidate {row.cand_idx}: {exc.message}", file=path, field="action")
    return DigiqError("a candidate action does not parse", file=path, field="action")


def per_state(table: pa.Table) -> Any:
    """One row per state: traj_id, step_id, n_candidates, n_distinct, two_distinct (0/1)."""
    frame = table.select(["traj_id", "step_id", "is_duplicate"]).to_pandas()
    grouped = frame.groupby(["traj_id", "step_id"], sort=True)["is_duplicate"]
    out = grouped.agg(n_candidates="size", n_duplicates="sum").reset_index()
    out["n_distinct"] = (out["n_candidates"] - out["n_duplicates"]).astype("int64")
    out["two_distinct"] = (out["n_distinct"] >= 2).astype("int64")
    return out.drop(columns="n_duplicates")


def diversity(table: pa.Table) -> dict[str, Any]:
    """Summary of per-state diversity: mean/min/quantiles of distinct actions, fraction with ≥ 2 distinct."""
    states = per_state(table)
    n = states["n_distinct"]
    return {
        "states": int(len(states)),
        "candidates": int(table.num_rows),
        "k": int(states["n_candidates"].max()) if len(states) else 0,
        "mean_distinct": float(n.mean()) if len(states) else 0.0,
        "min_distinct": int(n.min()) if len(states) else 0,
        "p10_distinct": float(n.quantile(0.1)) if len(states) else 0.0,
        "median_distinct": float(n.median()) if len(states) else 0.0,
        "frac_two_distinct": float(states["two_distinct"].mean()) if len(states) else 0.0,
        "duplicate_fraction": float(1.0 - n.sum() / max(int(states["n_candidates"].sum()), 1)),
    }


def diversity_suite(min_mean_distinct: float, min_frac_two_distinct: float) -> list[Any]:
    from digiq.checks import Expect

    return [
        Expect("ExpectColumnValuesToBeBetween", {"column": "n_distinct", "min_value": 1},
               "every state has at least one candidate"),
        Expect("ExpectColumnMeanToBeBetween", {"column": "n_distinct", "min_value": float(min_mean_distinct)},
               f"mean distinct actions per state ≥ {min_mean_distinct:g}"),
        Expect("ExpectColumnMeanToBeBetween", {"column": "two_distinct", "min_value": float(min_frac_two_distinct)},
               f"fraction of states with ≥ 2 distinct actions ≥ {min_frac_two_distinct:g}"),
    ]


def check_diversity(table: pa.Table, min_mean_distinct: float, min_frac_two_distinct: float,
                    docs_dir: Path | None = None) -> SuiteResult:
    """The action-diversity gate (Great Expectations) on the per-state summary."""
    from digiq.checks import run_suite

    return run_suite("action_diversity", per_state(table), diversity_suite(min_mean_distinct, min_frac_two_distinct),
                     docs_dir=docs_dir)


def write_candidates(table: pa.Table, path: str | Path) -> None:
    from digiq.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        pq.write_table(table.cast(CANDIDATES_SCHEMA), tmp)


def _progress(rows: list[Any], label: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return rows
    from rich.progress import track

    return track(rows, description=label, transient=True)
