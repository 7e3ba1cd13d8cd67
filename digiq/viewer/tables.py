"""Side tables the viewer joins onto a dataset's steps: ε-labels, critic scores, policy scores.

The contracts (also in ``digiq.viewer``'s docstring) are checked on load: a missing column, a wrong
type, a null, a non-finite number, an out-of-range value or a duplicated key is one ``DigiqError``
naming the file and the column. Extra columns are ignored. Integer columns may be any integer type,
float columns any integer or floating type, string columns string or large_string.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from digiq.actions import parse_action
from digiq.errors import ActionParseError, DigiqError
from digiq.parquet import read_table
from digiq.schema import Action

if TYPE_CHECKING:
    from digiq.viewer.contributions import Contributions

Key = tuple[str, int]  # (traj_id, step_id)

LABELS_FILE = "labels.parquet"
STEP_SCORES_FILE = "step_scores.parquet"
CANDIDATE_SCORES_FILE = "candidate_scores.parquet"
POLICY_SCORES_FILE = "policy_scores.parquet"
LABEL_VALUES = ("Yes", "No")


@dataclass(frozen=True)
class TableSpec:
    """Required (and optional) columns of a side table, each with a kind: str, int, float, bool or label."""

    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]
    optional: tuple[tuple[str, str], ...] = ()


KEY_COLUMNS = (("traj_id", "str"), ("step_id", "int"))
LABELS_SPEC = TableSpec(KEY_COLUMNS + (("mse", "float"), ("label", "label")), ("traj_id", "step_id"), (("epsilon", "float"),))
STEP_SCORES_SPEC = TableSpec(
    KEY_COLUMNS + (("v", "float"), ("q", "float"), ("advantage", "float"), ("td_error", "float")), ("traj_id", "step_id")
)
CANDIDATE_SCORES_SPEC = TableSpec(
    KEY_COLUMNS + (("cand_idx", "int"), ("action", "str"), ("q", "float")), ("traj_id", "step_id", "cand_idx")
)
POLICY_SCORES_SPEC = TableSpec(
    KEY_COLUMNS + (("cand_idx", "int"), ("action", "str"), ("prob", "float"), ("chosen", "bool")),
    ("traj_id", "step_id", "cand_idx"),
)


@dataclass(frozen=True)
class StepLabel:
    mse: float
    label: str  # "Yes" | "No"
    epsilon: float | None


@dataclass(frozen=True)
class StepScore:
    v: float  # V(s)
    q: float  # Q(s, a_data)
    advantage: float  # A(s, a_data), as the critic reports it
    td_error: float  # r + γ(1 − done)·V(s') − Q(s, a_data)


@dataclass(frozen=True)
class Candidate:
    cand_idx: int  # 0 = the dataset action
    action: Action
    score: float  # Q(s, a) for the critic, π(a | s) for the policy
    rank: int  # 1 = best score of the step
    chosen: bool = False  # the policy's pick (policy tables only)


@dataclass(frozen=True)
class Ranking:
    """A step's candidates: the top-k by score, plus the dataset action and the policy's pick if lower."""

    candidates: tuple[Candidate, ...]
    total: int  # how many candidates the step has in the table

    @property
    def data_rank(self) -> int | None:
        return next((c.rank for c in self.candidates if c.cand_idx == 0), None)

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.chosen), None)


@dataclass
class SideTables:
    """Everything the viewer shows beside the dataset, keyed by (traj_id, step_id)."""

    labels: dict[Key, StepLabel] | None = None
    scores: dict[Key, StepScore] | None = None
    candidates: dict[Key, Ranking] | None = None
    policy: dict[Key, Ranking] | None = None
    sources: dict[str, Path] | None = None  # table name -> file it came from
    contributions: Contributions | None = None  # the critic's channel contributions (digiq.viewer.contributions)

    @classmethod
    def load(
        cls, *, labels: str | Path | None = None, critic: str | Path | None = None, policy: str | Path | None = None, top_k: int = 5
    ) -> SideTables:
        tables = cls(sources={})
        if labels is not None:
            tables.labels = load_labels(labels)
            tables.sources["labels"] = Path(labels)
        if critic is not None:
            tables.scores = load_step_scores(critic_file(critic, STEP_SCORES_FILE))
            tables.sources["critic step scores"] = critic_file(critic, STEP_SCORES_FILE)
            cand_path = Path(critic) / CANDIDATE_SCORES_FILE
            if cand_path.exists():
                tables.candidates = load_candidate_scores(cand_path, top_k)
                tables.sources["critic candidate scores"] = cand_path
            from digiq.viewer.contributions import load_contributions

            tables.contributions = load_contributions(critic)
            if tables.contributions.steps is not None:
                tables.sources["critic channel contributions"] = tables.contributions.source
        if policy is not None:
            path = critic_file(policy, POLICY_SCORES_FILE)
            tables.policy = load_policy_scores(path, top_k)
            tables.sources["policy scores"] = path
        return tables

    def keyed(self) -> dict[str, Iterable[Key]]:
        """The keys of each loaded table (to check them against the dataset's steps)."""
        named = {"labels": self.labels, "critic step scores": self.scores, "critic candidate scores": self.candidates, "policy scores": self.policy,
                 "critic channel contributions": self.contributions.steps if self.contributions else None}
        return {name: table.keys() for name, table in named.items() if table is not None}


def critic_file(folder: str | Path, name: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise DigiqError(f"expected a folder containing {name}", file=folder)
    return folder / name


def read_side_table(path: str | Path, spec: TableSpec) -> pa.Table:
    """Read a Parquet side table, check it against ``spec`` and return it with normalised column types."""
    path = Path(path)
    if not path.is_file():
        raise DigiqError("file not found", file=path)
    table = read_table(path)
    present = [(name, kind) for name, kind in spec.optional if name in table.column_names]
    columns = [_checked_column(table, name, kind, path) for name, kind in spec.columns + tuple(present)]
    normalised = pa.table(dict(zip([name for name, _ in spec.columns + tuple(present)], columns)))
    _check_unique(normalised, spec.key, path)
    return normalised


_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "label": pa.string()}


def _checked_column(table: pa.Table, name: str, kind: str, path: Path) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DigiqError(f"missing column (have: {', '.join(table.column_names)})", file=path, field=name)
    column = table.column(name)
    if not _type_fits(column.type, kind):
        raise DigiqError(f"expected a {kind} column, got {column.type}", file=path, field=name)
    if column.null_count:
        raise DigiqError(f"{column.null_count} null value(s); first at row {_first(pc.is_null(column))}", file=path, field=name)
    column = column.cast(_TYPES[kind])
    if kind == "float":
        finite = pc.is_finite(column)
        if not pc.all(finite).as_py():
            raise DigiqError(f"non-finite value at row {_first(pc.invert(finite))}", file=path, field=name)
    if kind == "int" and len(column) and pc.min(column).as_py() < 0:
        raise DigiqError(f"negative value at row {_first(pc.less(column, 0))}", file=path, field=name)
    if kind == "label":
        bad = pc.invert(pc.is_in(column, value_set=pa.array(LABEL_VALUES)))
        if pc.any(bad).as_py():
            row = _first(bad)
            raise DigiqError(f"value {column[row].as_py()!r} at row {row} is not one of {', '.join(LABEL_VALUES)}", file=path, field=name)
    return column


def _type_fits(dtype: pa.DataType, kind: str) -> bool:
    if kind in ("str", "label"):
        return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    if kind == "int":
        return pa.types.is_integer(dtype)
    if kind == "float":
        return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)
    return pa.types.is_boolean(dtype)


def _first(mask: pa.ChunkedArray) -> int:
    return pc.index(mask, True).as_py()


def _check_unique(table: pa.Table, key: tuple[str, ...], path: Path) -> None:
    counts = table.group_by(list(key)).aggregate([([], "count_all")])
    dupes = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dupes.num_rows:
        first = {name: dupes.column(name)[0].as_py() for name in key}
        raise DigiqError(f"{dupes.num_rows} duplicated key(s), e.g. {first}", file=path, field=", ".join(key))


def load_labels(path: str | Path) -> dict[Key, StepLabel]:
    table = read_side_table(path, LABELS_SPEC)
    epsilons = table.column("epsilon").to_pylist() if "epsilon" in table.column_names else [None] * table.num_rows
    return {
        (t, s): StepLabel(mse=m, label=lab, epsilon=e)
        for t, s, m, lab, e in zip(*_columns(table, "traj_id", "step_id", "mse", "label"), epsilons)
    }


def load_step_scores(path: str | Path) -> dict[Key, StepScore]:
    table = read_side_table(path, STEP_SCORES_SPEC)
    return {
        (t, s): StepScore(v=v, q=q, advantage=a, td_error=d)
        for t, s, v, q, a, d in zip(*_columns(table, "traj_id", "step_id", "v", "q", "advantage", "td_error"))
    }


def load_candidate_scores(path: str | Path, top_k: int) -> dict[Key, Ranking]:
    return _rankings(read_side_table(path, CANDIDATE_SCORES_SPEC), Path(path), score="q", top_k=top_k)


def load_policy_scores(path: str | Path, top_k: int) -> dict[Key, Ranking]:
    path = Path(path)
    table = read_side_table(path, POLICY_SCORES_SPEC)
    prob = table.column("prob")
    if table.num_rows and (pc.min(prob).as_py() < 0 or pc.max(prob).as_py() > 1):
        outside = pc.or_(pc.less(prob, 0), pc.greater(prob, 1))
        raise DigiqError(f"probability outside [0, 1] at row {_first(outside)}", file=path, field="prob")
    chosen = table.filter(table.column("chosen")).group_by(["traj_id", "step_id"]).aggregate([([], "count_all")])
    several = chosen.filter(pc.greater(chosen.column("count_all"), 1))
    if several.num_rows:
        where = f"trajectory {several.column('traj_id')[0].as_py()!r} step {several.column('step_id')[0].as_py()}"
        raise DigiqError(f"{where} has {several.column('count_all')[0].as_py()} chosen candidates (at most one)", file=path, field="chosen")
    return _rankings(table, path, score="prob", top_k=top_k)


def _rankings(table: pa.Table, path: Path, *, score: str, top_k: int) -> dict[Key, Ranking]:
    """Per step: candidates ranked by ``score`` (ties: lower cand_idx first); keep the top-k, cand 0 and the chosen one."""
    import duckdb

    has_chosen = "chosen" in table.column_names
    con = duckdb.connect()
    con.register("candidates", table)
    rows = con.execute(
        f"""
        SELECT traj_id, step_id, cand_idx, action, {score} AS score, {"chosen" if has_chosen else "false"} AS chosen,
               row_number() OVER (PARTITION BY traj_id, step_id ORDER BY {score} DESC, cand_idx) AS rank,
               count(*) OVER (PARTITION BY traj_id, step_id) AS total
        FROM candidates
        QUALIFY rank <= ? OR cand_idx = 0 OR chosen
        ORDER BY traj_id, step_id, rank
        """,
        [top_k],
    ).fetchall()
    con.close()
    grouped: dict[Key, list[Candidate]] = {}
    totals: dict[Key, int] = {}
    for traj_id, step_id, cand_idx, action, value, chosen, rank, total in rows:
        key = (traj_id, step_id)
        grouped.setdefault(key, []).append(Candidate(cand_idx, _parse(action, path, key, cand_idx), value, rank, chosen))
        totals[key] = total
    return {key: Ranking(tuple(cands), totals[key]) for key, cands in grouped.items()}


def _parse(text: str, path: Path, key: Key, cand_idx: int) -> Action:
    try:
        return parse_action(text)
    except ActionParseError as exc:
        raise DigiqError(f"trajectory {key[0]!r} step {key[1]} candidate {cand_idx}: {exc.message}", file=path, field="action") from None


def _columns(table: pa.Table, *names: str) -> list[list[Any]]:
    return [table.column(name).to_pylist() for name in names]
