"""Candidate actions: K actions per state from the behaviour policy π_β, index 0 = the dataset action.

    table = make_candidates(Dataset("data/raw"), k=64, seed=0)     # the candidate table, one row per candidate
    summary = diversity(table)                                       # distinct actions per state
    check_diversity(table, min_mean_distinct=4, min_frac_two_distinct=0.9).raise_for_failures(path)

Sampling (Digi-Q samples K actions from π_β at every stored state, duplicates included):

- candidate 0 is the dataset action (its stored string, unchanged); candidates 1..K−1 are K−1 independent
  draws ``π_β.sample(step, K − 1, rng)`` at the stored state (goal + DOM elements + previous actions);
- ``rng`` is seeded per state from ``(seed, traj_id, step_id)`` (a SeedSequence over a sha256 of the key),
  so a state's candidates do not depend on which other states are sampled or in which order;
- duplicates are kept as sampled and de-duplicated once, here, by what they do: each candidate carries its
  :func:`~digiq.feature_contract.semantic_key` and ``draws``, the draws of the state its class stands for at the
  class's first candidate and 0 at a repeat (so ``n_distinct`` = the candidates with draws > 0). Training, the
  diversity gate and the viewer read these columns; live evaluation applies the same rule to live draws.

Imported official data (a dataset with its own ``candidates.parquet``, written by the importer from ``action_list``)
keeps its candidates: :func:`make_candidates` reads them and adds the semantic keys and draws.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digiq.actions import format_action, parse_action
from digiq.errors import DigiqError
from digiq.feature_contract import CANDIDATE_TABLE_SCHEMA, draw_counts, semantic_key

if TYPE_CHECKING:
    from digiq.checks import SuiteResult
    from digiq.envs.behavior import BehaviorPolicy
    from digiq.store import Dataset

IMPORTED_FILE = "candidates.parquet"  # written by digiq.importer next to manifest.json
STEP_COLUMNS = ["traj_id", "step_id", "task", "goal", "observation", "elements", "action"]


def state_rng(seed: int, traj_id: str, step_id: int) -> np.random.Generator:
    """The generator of one state: a function of (seed, traj_id, step_id) only."""
    digest = hashlib.sha256(f"{traj_id}/{int(step_id)}".encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words]))


def canonical(action: str) -> str:
    """The canonical AutoUI string of an action."""
    return format_action(parse_action(action))


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


def candidate_table(states: Iterable[tuple[dict[str, Any], list[str]]]) -> pa.Table:
    """(step-table row, its candidate action strings in cand_idx order) pairs as the candidate table: each candidate
    with its semantic key (taps by the row's DOM elements) and draw count."""
    from digiq.envs.view import parse_elements

    columns: dict[str, list[Any]] = {name: [] for name in CANDIDATE_TABLE_SCHEMA.names}
    for row, actions in states:
        elements = parse_elements(row.get("elements"))
        keys = [semantic_key(action, elements) for action in actions]
        columns["traj_id"] += [row["traj_id"]] * len(actions)
        columns["step_id"] += [row["step_id"]] * len(actions)
        columns["cand_idx"] += range(len(actions))
        columns["action"] += actions
        columns["semantic_key"] += keys
        columns["draws"] += draw_counts(keys)
    return pa.table(columns, schema=CANDIDATE_TABLE_SCHEMA)


def make_candidates(dataset: Dataset, k: int, seed: int, *, policy: BehaviorPolicy | None = None,
                    progress: bool = False) -> pa.Table:
    """The candidate table of ``dataset`` (imported ``candidates.parquet`` when the dataset has one)."""
    imported = Path(dataset.root) / IMPORTED_FILE
    if imported.is_file():
        return read_imported(imported, dataset)
    from digiq.envs.behavior import BehaviorPolicy
    from digiq.progress import progress_bar

    policy = policy or BehaviorPolicy()
    rows = dataset.table().select(STEP_COLUMNS).to_pylist()
    states = []
    with progress_bar("candidates", total=len(rows), enabled=progress, unit="states") as bar:
        for row in rows:
            states.append((row, sample_state(policy, row, k, seed)))
            bar.advance()
    return candidate_table(states)


def read_imported(path: Path, dataset: Dataset) -> pa.Table:
    """An importer-written candidate table (traj_id, step_id, cand_idx, action) with semantic keys and draws added."""
    from digiq.parquet import read_table

    table = read_table(path, columns=["traj_id", "step_id", "cand_idx", "action"])
    frame = table.sort_by([("traj_id", "ascending"), ("step_id", "ascending"), ("cand_idx", "ascending")]).to_pandas()
    steps = dataset.table().select(["traj_id", "step_id", "elements", "action"]).to_pandas()
    rows = {(r.traj_id, r.step_id): {"traj_id": r.traj_id, "step_id": r.step_id, "elements": r.elements} for r in steps.itertuples()}
    groups = frame.groupby(["traj_id", "step_id"], sort=False)["action"]
    try:
        out = candidate_table((rows.get(key, {"traj_id": key[0], "step_id": key[1]}), actions.tolist()) for key, actions in groups)
    except DigiqError:
        raise _unparsable_candidate(frame, path) from None
    out = out.set_column(out.schema.get_field_index("cand_idx"), "cand_idx", pa.array(frame["cand_idx"], pa.int32()))
    merged = steps.merge(frame[frame["cand_idx"] == 0], on=["traj_id", "step_id"], how="left", suffixes=("", "_c"))
    missing = merged[merged["action_c"].isna()]
    if len(missing):
        first = missing.iloc[0]
        raise DigiqError(f"state {first.traj_id}/{first.step_id} has no candidate 0 ({len(missing)} states)",
                         file=path, field="cand_idx")
    return out


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
    frame = table.select(["traj_id", "step_id", "draws"]).to_pandas()
    frame["distinct"] = frame["draws"] > 0
    out = frame.groupby(["traj_id", "step_id"], sort=True)["distinct"].agg(n_candidates="size", n_distinct="sum").reset_index()
    out["n_distinct"] = out["n_distinct"].astype("int64")
    out["two_distinct"] = (out["n_distinct"] >= 2).astype("int64")
    return out


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
        pq.write_table(table.cast(CANDIDATE_TABLE_SCHEMA), tmp)
