"""The feature store's inputs, checked, and the state-keyed tables derived from them (DuckDB; no Feast).

    data/embeddings/<variant>/states.parquet      ─┐
    data/embeddings/<variant>/candidates.parquet  ─┤
    data/candidates.parquet (semantic keys, draws) ┤ check ─▶ transitions, labels, candidate blocks
    data/labels.parquet, data/raw (step table)    ─┘          (data/features/<variant>/, stamped EPOCH)

Schemas, keys and timestamps are the contract's (:mod:`digiq.feature_contract`); a bad input is one DigiqError
naming the file and the column.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from digiq import feature_contract as fc
from digiq.errors import DigiqError

if TYPE_CHECKING:
    from digiq.config import Params


@dataclass
class FeatureInputs:
    """Where the features stage reads from and writes to (absolute paths: Feast sees them as given)."""

    repo: Path
    variant: str
    states: Path
    candidates: Path
    candidate_table: Path
    labels: Path
    dataset: Path
    derived: Path
    online_store: dict[str, Any] | None = None  # None / type sqlite: the variant's own SQLite file
    channels: Path | None = None  # `digiq channels`' folder: its views are served when given

    @classmethod
    def from_params(cls, params: Params) -> FeatureInputs:
        f = params.features
        paths = fc.source_paths(f.embeddings, f.derived, f.variant)
        return cls(repo=Path(f.repo).resolve(), variant=f.variant, states=Path(paths["states"]),
                   candidates=Path(paths["candidates"]), candidate_table=Path(params.candidates.out).resolve(),
                   labels=Path(params.label.out).resolve(), dataset=Path(params.collect.out).resolve(),
                   derived=Path(f.derived).resolve() / f.variant, online_store=f.online_store,
                   channels=channels_folder(params))

    def source_paths(self) -> dict[str, str]:
        """The Feast sources, by name (the channel sources when the channels folder is given)."""
        paths = {"states": str(self.states), "candidates": str(self.candidates),
                 **{name: str(self.derived / f"{name}.parquet") for name in fc.DERIVED}}
        if self.channels is not None:
            paths.update({name: str(self.channels / file) for name, file in fc.CHANNEL_SOURCES.items()})
        return paths


def channels_folder(params: Params) -> Path | None:
    """``channels.out`` (absolute) when `digiq channels` wrote its tables there, else None (no channel views)."""
    section = getattr(params, "channels", None)
    folder = Path(section.out).resolve() if section is not None else None
    if folder is None or not any((folder / file).is_file() for file in fc.CHANNEL_SOURCES.values()):
        return None
    return folder


# ----------------------------------------------------------------------------- column checks

_KIND_TEXT = {"string": "a string", "int": "an integer", "float": "a float", "bool": "a boolean",
              "timestamp": "a timestamp with a time zone (UTC)", "vector": "fixed_size_list<float32>[d]"}


def _kind(dtype: pa.DataType) -> str:
    """The family a column type belongs to, as far as the readers care."""
    checks = (("string", pa.types.is_string(dtype) or pa.types.is_large_string(dtype)), ("int", pa.types.is_integer(dtype)),
              ("float", pa.types.is_floating(dtype)), ("bool", pa.types.is_boolean(dtype)),
              ("timestamp", pa.types.is_timestamp(dtype) and dtype.tz is not None),
              ("vector", pa.types.is_fixed_size_list(dtype) and pa.types.is_float32(dtype.value_type)))
    return next((kind for kind, matches in checks if matches), str(dtype))


def check_table(path: str | Path, schema: pa.Schema, rerun: str = "") -> pa.Schema:
    """The Parquet schema of ``path`` after checking it has the columns of ``schema`` in their type families, every page
    of them decodes (DuckDB and Feast read them later) and vectors are finite (DigiqError otherwise). ``rerun`` names
    the command that writes the table, for a table written before a column existed."""
    from digiq.parquet import read_schema, read_table

    path = Path(path)
    if not path.is_file():
        raise DigiqError("missing input table (was the stage that writes it run?)", file=path)
    found = read_schema(path)
    for column in schema:
        if column.name not in found.names:
            raise DigiqError(f"missing column{f' (written by an older digiq? re-run `{rerun}`)' if rerun else ''}",
                             file=path, field=column.name)
        dtype = found.field(column.name).type
        if _kind(dtype) != _kind(column.type):
            raise DigiqError(f"expected {_KIND_TEXT[_kind(column.type)]}, got {dtype}", file=path, field=column.name)
    table = read_table(path, schema.names)
    for column in schema:
        if _kind(column.type) == "vector":
            _check_finite(table, column.name, schema.names[0], path)
    return found


def _check_finite(table: pa.Table, column: str, key: str, path: Path) -> None:
    """Every value of a fixed-size vector column is finite (a NaN embedding would poison every Q value)."""
    vectors = table[column].combine_chunks()
    if vectors.null_count:
        first = pc.index(pc.is_null(vectors), True).as_py()
        raise DigiqError(f"{key} {table[key][first].as_py()!r} has no value ({vectors.null_count} rows)", file=path, field=column)
    finite = np.isfinite(np.asarray(vectors.flatten(), dtype=np.float32)).reshape(len(vectors), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DigiqError(f"{key} {table[key][int(bad[0])].as_py()!r} has NaN or infinite values ({len(bad)} of {len(finite)} rows)",
                         file=path, field=column)


def vector_dim(schema: pa.Schema, column: str = "embedding") -> int:
    return schema.field(column).type.list_size


def check_recorded_dims(states: Path, candidates: Path, dim_state: int, dim_candidate: int) -> None:
    """The tables' vector sizes must be the ones their embedding run recorded (``embedding.json``: dim_state,
    dim_candidate). f(s) and f(s, a) may differ in size (the no_vlm variant); without a manifest (hand-made tables)
    any sizes are accepted."""
    manifest = states.parent / fc.MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text())
        expected = {states: int(recorded["dim_state"]), candidates: int(recorded["dim_candidate"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise DigiqError(f"unreadable or incomplete ({exc!r}); re-run `digiq embed`", file=manifest, field="dim_state") from None
    for path, got in ((states, dim_state), (candidates, dim_candidate)):
        if got != expected[path]:
            raise DigiqError(f"embedding size {got} differs from the {expected[path]} that {fc.MANIFEST_FILE} records",
                             file=path, field="embedding")


# ----------------------------------------------------------------------------- key checks (DuckDB)

@contextlib.contextmanager
def duckdb_connection() -> Iterator[Any]:
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        yield con
    finally:
        con.close()


def _first(con: Any, sql: str) -> Any:
    row = con.execute(sql).fetchone()
    return None if row is None else row[0] if len(row) == 1 else row


def _raise_first(checks: list[tuple[Path, str, str, str]]) -> None:
    """Run (file, column, SQL, message) checks in order; the first SQL that finds a row raises its message."""
    with duckdb_connection() as con:
        for file, column, sql, message in checks:
            bad = _first(con, sql)
            if bad is not None:
                raise DigiqError(message.format(bad), file=file, field=column)


def check_keys(states: Path, candidates: Path) -> None:
    """Keys follow the contract, are unique per timestamp, and every state's candidates are 0..K-1."""
    s, c = f"read_parquet('{states}')", f"read_parquet('{candidates}')"
    _raise_first([
        (states, "state_key", f"SELECT state_key FROM {s} WHERE state_key IS DISTINCT FROM {fc.state_key_sql()} LIMIT 1",
         "state_key {!r} is not f'{{traj_id}}/{{step_id}}'"),
        (states, "state_key", f"SELECT state_key FROM {s} GROUP BY state_key, event_timestamp HAVING count(*) > 1 LIMIT 1",
         "state_key {!r} appears twice with the same event_timestamp"),
        (candidates, "cand_key", f"SELECT cand_key FROM {c} WHERE cand_key IS DISTINCT FROM {fc.cand_key_sql()} "
         f"OR state_key IS DISTINCT FROM {fc.state_key_sql()} LIMIT 1",
         "cand_key {!r} is not f'{{state_key}}/{{cand_idx}}' with state_key f'{{traj_id}}/{{step_id}}'"),
        (candidates, "cand_key", f"SELECT cand_key FROM {c} GROUP BY cand_key, event_timestamp HAVING count(*) > 1 LIMIT 1",
         "cand_key {!r} appears twice with the same event_timestamp"),
        (candidates, "cand_idx", f"SELECT state_key FROM {c} GROUP BY state_key "
         "HAVING min(cand_idx) <> 0 OR max(cand_idx) + 1 <> count(DISTINCT cand_idx) LIMIT 1",
         "the candidates of state {!r} are not numbered 0..K-1 (cand_idx 0 is the dataset action)"),
        (candidates, "state_key", f"SELECT c.state_key FROM {c} c ANTI JOIN {s} s USING (state_key) LIMIT 1",
         "candidates of state {!r}, which has no row in the states table"),
    ])


def check_candidate_table(embedded: Path, table: Path) -> None:
    """The candidate table the embeddings were made from: every embedded candidate is in it with the same action, and
    each state's draws add up to its candidates."""
    _raise_first([
        (table, "action", f"SELECT e.cand_key FROM read_parquet('{embedded}') e LEFT JOIN read_parquet('{table}') t "
         "ON t.traj_id = e.traj_id AND t.step_id = e.step_id AND t.cand_idx = e.cand_idx WHERE t.action IS DISTINCT FROM e.action LIMIT 1",
         "candidate {!r} of the embeddings is not this table's (re-run `digiq embed` on this candidate table)"),
        (table, "draws", f"SELECT {fc.state_key_sql()} FROM read_parquet('{table}') GROUP BY traj_id, step_id "
         "HAVING sum(draws) <> count(*) OR min(draws) < 0 LIMIT 1",
         "the draws of state {!r} do not add up to its candidates"),
    ])


# ----------------------------------------------------------------------------- derived tables

def _stamped(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the derived rows' event timestamp (the contract's EPOCH) appended, cast to ``schema``."""
    return table.append_column("event_timestamp", pa.array([fc.EPOCH] * table.num_rows, fc.TIMESTAMP)).cast(schema)


def derive_transitions(steps: pa.Table, candidates: Path) -> pa.Table:
    """One row per dataset step: state_key, next_state_key, reward, done, mc_return, action, n_candidates.

    next_state_key is the next stored step of the same trajectory, and null when the step is terminal (done) or the
    last stored step of a cut-off episode (no s' was kept)."""
    key, next_key = fc.state_key_sql("s.traj_id", "s.step_id"), fc.state_key_sql("nx.traj_id", "nx.step_id")
    with duckdb_connection() as con:
        con.register("steps", steps.select(["traj_id", "step_id", "reward", "done", "mc_return", "action"]))
        table = con.sql(f"""
            WITH counts AS (
                SELECT state_key, count(DISTINCT cand_idx)::INTEGER AS n_candidates
                FROM read_parquet('{candidates}') GROUP BY state_key)
            SELECT {key} AS state_key,
                   CASE WHEN s.done OR nx.step_id IS NULL THEN NULL ELSE {next_key} END AS next_state_key,
                   s.reward, s.done, s.mc_return, s.action, coalesce(c.n_candidates, 0)::INTEGER AS n_candidates
            FROM steps s
            LEFT JOIN steps nx ON nx.traj_id = s.traj_id AND nx.step_id = s.step_id + 1
            LEFT JOIN counts c ON c.state_key = {key}
            ORDER BY s.traj_id, s.step_id""").to_arrow_table()
    return _stamped(table, fc.TRANSITIONS_SCHEMA)


def derive_candidate_blocks(embedded: Path, table: Path) -> pa.Table:
    """One row per (state_key, event_timestamp) of the embedded candidates: their vectors concatenated in cand_idx order,
    actions, semantic keys and draws (from the candidate table). The online store serves a state's candidates from
    this row: one lookup instead of K."""
    with duckdb_connection() as con:
        blocks = con.sql(f"""
            SELECT e.state_key, e.event_timestamp,
                   flatten(list(e.embedding::FLOAT[] ORDER BY e.cand_idx)) AS embeddings,
                   list(e.action ORDER BY e.cand_idx) AS actions,
                   list(t.semantic_key ORDER BY e.cand_idx) AS semantic_keys,
                   list(t.draws ORDER BY e.cand_idx) AS draws, count(*)::INTEGER AS n_candidates
            FROM read_parquet('{embedded}') e
            JOIN read_parquet('{table}') t ON t.traj_id = e.traj_id AND t.step_id = e.step_id AND t.cand_idx = e.cand_idx
            GROUP BY e.state_key, e.event_timestamp
            ORDER BY e.state_key, e.event_timestamp""").to_arrow_table()
    return blocks.cast(fc.CANDIDATE_BLOCKS_SCHEMA)


def derive_labels(labels: Path) -> pa.Table:
    """The ε-label table keyed by state_key (one row per labelled step)."""
    key = fc.state_key_sql()
    with duckdb_connection() as con:
        duplicate = _first(con, f"SELECT {key} FROM read_parquet('{labels}') GROUP BY traj_id, step_id HAVING count(*) > 1 LIMIT 1")
        if duplicate is not None:
            raise DigiqError(f"step {duplicate!r} is labelled twice", file=labels, field="step_id")
        table = con.sql(f"""
            SELECT {key} AS state_key, label, mse::DOUBLE AS mse, epsilon::DOUBLE AS epsilon, action_kind
            FROM read_parquet('{labels}') ORDER BY traj_id, step_id""").to_arrow_table()
    return _stamped(table, fc.LABELS_SCHEMA)


def check_coverage(transitions: pa.Table, labels: pa.Table, inputs: FeatureInputs) -> None:
    """Every dataset step has f(s) and at least its dataset action as candidate 0; labels name real steps."""
    total = transitions.num_rows
    with duckdb_connection() as con:
        con.register("transitions", transitions.select(["state_key", "n_candidates"]))
        con.register("labels", labels.select(["state_key"]))
        missing = con.execute(f"SELECT count(*), min(state_key) FROM transitions t ANTI JOIN read_parquet('{inputs.states}') s USING (state_key)").fetchone()
        if missing[0]:
            raise DigiqError(f"no embedding for state {missing[1]!r} ({missing[0]} of {total} dataset steps missing)",
                             file=inputs.states, field="state_key")
        missing = con.execute("SELECT count(*), min(state_key) FROM transitions WHERE n_candidates = 0").fetchone()
        if missing[0]:
            raise DigiqError(f"no candidates for state {missing[1]!r} ({missing[0]} of {total} dataset steps missing)",
                             file=inputs.candidates, field="state_key")
        stray = _first(con, "SELECT l.state_key FROM labels l ANTI JOIN transitions t USING (state_key) LIMIT 1")
        if stray is not None:
            raise DigiqError(f"label for step {stray!r}, which is not in the dataset", file=inputs.labels, field="step_id")


def check_and_derive(inputs: FeatureInputs) -> tuple[dict[str, int], dict[str, pa.Table]]:
    """Validate the inputs (DigiqError naming file and field) and derive the state-keyed tables by name
    (transitions, labels, candidate_blocks); also the vector sizes (dim, dim_candidate)."""
    from digiq.store import Dataset

    states_schema = check_table(inputs.states, fc.states_schema(1))
    candidates_schema = check_table(inputs.candidates, fc.candidates_schema(1))
    check_table(inputs.candidate_table, fc.CANDIDATE_TABLE_SCHEMA, rerun="digiq candidates")
    check_table(inputs.labels, fc.LABELS_READ)
    dims = {"dim": vector_dim(states_schema), "dim_candidate": vector_dim(candidates_schema)}
    check_recorded_dims(inputs.states, inputs.candidates, dims["dim"], dims["dim_candidate"])
    check_keys(inputs.states, inputs.candidates)
    check_candidate_table(inputs.candidates, inputs.candidate_table)
    transitions = derive_transitions(Dataset(inputs.dataset).table(), inputs.candidates)
    labels = derive_labels(inputs.labels)
    check_coverage(transitions, labels, inputs)
    if inputs.channels is not None:
        dims.update(check_channels(inputs, transitions))
    return dims, {"transitions": transitions, "labels": labels,
                  "candidate_blocks": derive_candidate_blocks(inputs.candidates, inputs.candidate_table)}


def check_channels(inputs: FeatureInputs, transitions: pa.Table) -> dict[str, int]:
    """The channels stage's tables: their columns, and a row for every dataset step and every embedded candidate
    (they were made from the same dataset and candidate table); the channel sizes."""
    assert inputs.channels is not None
    states, candidates = (inputs.channels / fc.CHANNEL_SOURCES[name] for name in fc.CHANNEL_SOURCES)
    state_schema = check_table(states, fc.channel_states_schema(), rerun="digiq channels")
    cand_schema = check_table(candidates, fc.channel_candidates_schema(), rerun="digiq channels")
    with duckdb_connection() as con:
        con.register("transitions", transitions.select(["state_key"]))
        for path, key, sql in (
            (states, "state_key", f"SELECT count(*), min(t.state_key) FROM transitions t ANTI JOIN read_parquet('{states}') c USING (state_key)"),
            (candidates, "cand_key", f"SELECT count(*), min(e.cand_key) FROM read_parquet('{inputs.candidates}') e "
                                     f"ANTI JOIN read_parquet('{candidates}') c USING (cand_key)"),
        ):
            missing, first = con.execute(sql).fetchone()
            if missing:
                raise DigiqError(f"no channels for {key} {first!r} ({missing} missing; re-run `digiq channels` on this "
                                 "dataset and candidate table)", file=path, field=key)
    from digiq.channels import STATE_CHANNELS

    return {f"dim_{name}": vector_dim(schema, name) for schema, names in ((state_schema, STATE_CHANNELS),
                                                                          (cand_schema, ("action",))) for name in names}


# ----------------------------------------------------------------------------- what was served

def timestamp_range(paths: list[str]) -> tuple[datetime, datetime]:
    """[earliest, latest + 1 s) over every source: the materialization window (from the data, not now())."""
    union = " UNION ALL ".join(f"SELECT min(event_timestamp) AS lo, max(event_timestamp) AS hi FROM read_parquet('{p}')" for p in paths)
    with duckdb_connection() as con:
        lo, hi = con.execute(f"SELECT min(lo), max(hi) FROM ({union})").fetchone()
    return lo.astimezone(timezone.utc), hi.astimezone(timezone.utc) + timedelta(seconds=1)


def summary(inputs: FeatureInputs, dims: dict[str, int], derived: dict[str, pa.Table]) -> dict[str, Any]:
    """Rows served per view, candidates per state, cut-off steps and the models that made the embeddings."""
    transitions = derived["transitions"]
    with duckdb_connection() as con:
        models = con.execute(f"SELECT DISTINCT model_hash, layer FROM read_parquet('{inputs.states}') ORDER BY ALL").fetchall()
        rows = {"state_embedding": _count_keys(con, inputs.states, "state_key"),
                "candidate_embedding": _count_keys(con, inputs.candidates, "cand_key")}
        if inputs.channels is not None:
            paths = inputs.source_paths()
            rows |= {view.name: _count_keys(con, Path(paths[view.source]), view.key)
                     for view in fc.VIEWS if view.source in fc.CHANNEL_SOURCES}
    return {
        "variant": inputs.variant,
        "channels": str(inputs.channels) if inputs.channels is not None else None,
        **dims,
        "rows": {**rows, "candidate_block": derived["candidate_blocks"].num_rows, "transition": transitions.num_rows,
                 "eps_label": derived["labels"].num_rows},
        "candidates_per_state": {"min": int(pc.min(transitions["n_candidates"]).as_py()),
                                 "max": int(pc.max(transitions["n_candidates"]).as_py())},
        "terminal_or_cut_off": int(pc.sum(pc.is_null(transitions["next_state_key"])).as_py()),
        "models": [{"model_hash": h, "layer": layer} for h, layer in models],
    }


def _count_keys(con: Any, path: Path, key: str) -> int:
    return int(_first(con, f"SELECT count(DISTINCT {key}) FROM read_parquet('{path}')"))
