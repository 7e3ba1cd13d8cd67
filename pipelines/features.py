"""Stage `features`: serve the frozen embeddings, ε-labels and rewards through Feast.

    data/embeddings/<variant>/states.parquet      ─┐
    data/embeddings/<variant>/candidates.parquet  ─┤ check ─▶ derive transitions + labels (state_key, event_timestamp)
    data/labels.parquet, data/raw (step table)    ─┘        ─▶ feast apply ─▶ materialize (SQLite online store)
                                                            ─▶ metrics/features.json

The Feast repository is ``features/`` (definitions in ``features/digiq_feature_repo.py``). Its run-time
state lives in ``features/data/<variant>/`` (registry, online store, derived sources, the source paths
used), is git-ignored and is never a DVC dependency: the registry changes on every apply.

Readers:
- :func:`open_store` → a ``feast.FeatureStore`` for a variant;
- :func:`online_state` → one state's features (and its K candidates) from the online store;
- :func:`training_frame` → the critic's training set, built with ``get_historical_features``.

Feast is imported inside functions (``import feast`` costs ~3 s); the library (``digiq/``) never
imports it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from digiq.atomic import atomic_path, write_json, write_text
from digiq.config import FeaturesParams
from digiq.embed import CANDIDATES_FILE, MANIFEST_FILE, STATES_FILE
from digiq.errors import DigiqError

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

# Event timestamps are deterministic: a fixed epoch plus an offset, never now(). Derived rows
# (transitions, labels) carry FEATURE_EPOCH; a training set is read "as of" AS_OF unless told otherwise.
FEATURE_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
AS_OF = datetime(2100, 1, 1, tzinfo=timezone.utc)

REPO_MODULE = "digiq_feature_repo.py"
VIEWS = ("state_embedding", "candidate_embedding", "candidate_block", "transition", "eps_label")
STATE_REFS = [
    "state_embedding:embedding", "state_embedding:model_hash", "state_embedding:layer",
    "transition:next_state_key", "transition:reward", "transition:done", "transition:mc_return",
    "transition:action", "transition:n_candidates",
    "eps_label:label", "eps_label:mse", "eps_label:epsilon", "eps_label:action_kind",
]
CANDIDATE_REFS = ["candidate_block:embeddings", "candidate_block:actions"]
_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def features_params(params: Any) -> FeaturesParams:
    """The `features` section of loaded params."""
    return params.features


# ----------------------------------------------------------------------------- source contracts

@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "string", "int", "float", "bool", "timestamp", "vector"


STATES_COLUMNS = [Column("state_key", "string"), Column("traj_id", "string"), Column("step_id", "int"),
                  Column("event_timestamp", "timestamp"), Column("embedding", "vector"),
                  Column("model_hash", "string"), Column("layer", "int")]
CANDIDATES_COLUMNS = [Column("cand_key", "string"), Column("state_key", "string"), Column("traj_id", "string"),
                      Column("step_id", "int"), Column("cand_idx", "int"), Column("action", "string"),
                      Column("event_timestamp", "timestamp"), Column("embedding", "vector"),
                      Column("model_hash", "string"), Column("layer", "int")]
LABELS_COLUMNS = [Column("traj_id", "string"), Column("step_id", "int"), Column("action_kind", "string"),
                  Column("mse", "float"), Column("label", "string"), Column("epsilon", "float")]

TRANSITIONS_SCHEMA = pa.schema([
    ("state_key", pa.string()), ("next_state_key", pa.string()), ("reward", pa.float64()), ("done", pa.bool_()),
    ("mc_return", pa.float64()), ("action", pa.string()), ("n_candidates", pa.int32()),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
])
CANDIDATE_BLOCKS_SCHEMA = pa.schema([
    ("state_key", pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")), ("embeddings", pa.list_(pa.float32())),
    ("actions", pa.list_(pa.string())), ("n_candidates", pa.int32()),
])
DERIVED_LABELS_SCHEMA = pa.schema([
    ("state_key", pa.string()), ("label", pa.string()), ("mse", pa.float64()), ("epsilon", pa.float64()),
    ("action_kind", pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")),
])


def _kind_matches(kind: str, dtype: pa.DataType) -> bool:
    if kind == "string":
        return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    if kind == "int":
        return pa.types.is_integer(dtype)
    if kind == "float":
        return pa.types.is_floating(dtype)
    if kind == "timestamp":
        return pa.types.is_timestamp(dtype) and dtype.tz is not None
    if kind == "vector":
        return pa.types.is_fixed_size_list(dtype) and pa.types.is_float32(dtype.value_type)
    raise ValueError(kind)


_KIND_TEXT = {"string": "a string", "int": "an integer", "float": "a float", "timestamp": "a timestamp with a time zone (UTC)",
              "vector": "fixed_size_list<float32>[d]"}


def check_table(path: str | Path, columns: list[Column]) -> pa.Schema:
    """The Parquet schema of ``path`` after checking it has ``columns`` of the right kinds, every page of them
    decodes (DuckDB and Feast read them later) and vectors are finite (DigiqError otherwise)."""
    from digiq.parquet import read_schema, read_table

    path = Path(path)
    if not path.is_file():
        raise DigiqError("missing input table (was the stage that writes it run?)", file=path)
    schema = read_schema(path)
    for column in columns:
        if column.name not in schema.names:
            raise DigiqError("missing column", file=path, field=column.name)
        dtype = schema.field(column.name).type
        if not _kind_matches(column.kind, dtype):
            raise DigiqError(f"expected {_KIND_TEXT[column.kind]}, got {dtype}", file=path, field=column.name)
    table = read_table(path, [column.name for column in columns])
    for column in columns:
        if column.kind == "vector":
            _check_finite(table, column.name, columns[0].name, path)
    return schema


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
    dim_candidate). f(s) and f(s, a) may differ in size (the no_vlm variant: 384 and 795); without a manifest
    (hand-made tables) any sizes are accepted."""
    manifest = states.parent / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text())
        expected = {states: int(recorded["dim_state"]), candidates: int(recorded["dim_candidate"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise DigiqError(f"unreadable or incomplete ({exc!r}); re-run `digiq embed`", file=manifest, field="dim_state") from None
    for path, got in ((states, dim_state), (candidates, dim_candidate)):
        if got != expected[path]:
            raise DigiqError(f"embedding size {got} differs from the {expected[path]} that {MANIFEST_FILE} records",
                             file=path, field="embedding")


@contextlib.contextmanager
def _duckdb() -> Iterator[Any]:
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        yield con
    finally:
        con.close()


def _first(con: Any, sql: str, params: list[Any] | None = None) -> Any:
    row = con.execute(sql, params or []).fetchone()
    return None if row is None else row[0] if len(row) == 1 else row


def check_keys(states: Path, candidates: Path) -> None:
    """Keys follow the contract, are unique per timestamp, and every state's candidates are 0..K-1."""
    with _duckdb() as con:
        checks = [
            (states, "state_key", f"SELECT state_key FROM read_parquet('{states}') WHERE state_key IS DISTINCT FROM traj_id || '/' || step_id LIMIT 1",
             "state_key {!r} is not f'{{traj_id}}/{{step_id}}'"),
            (states, "state_key", f"SELECT state_key FROM read_parquet('{states}') GROUP BY state_key, event_timestamp HAVING count(*) > 1 LIMIT 1",
             "state_key {!r} appears twice with the same event_timestamp"),
            (candidates, "cand_key", f"SELECT cand_key FROM read_parquet('{candidates}') WHERE cand_key IS DISTINCT FROM state_key || '/' || cand_idx "
             "OR state_key IS DISTINCT FROM traj_id || '/' || step_id LIMIT 1",
             "cand_key {!r} is not f'{{state_key}}/{{cand_idx}}' with state_key f'{{traj_id}}/{{step_id}}'"),
            (candidates, "cand_key", f"SELECT cand_key FROM read_parquet('{candidates}') GROUP BY cand_key, event_timestamp HAVING count(*) > 1 LIMIT 1",
             "cand_key {!r} appears twice with the same event_timestamp"),
            (candidates, "cand_idx", f"SELECT state_key FROM read_parquet('{candidates}') GROUP BY state_key "
             "HAVING min(cand_idx) <> 0 OR max(cand_idx) + 1 <> count(DISTINCT cand_idx) LIMIT 1",
             "the candidates of state {!r} are not numbered 0..K-1 (cand_idx 0 is the dataset action)"),
            (candidates, "state_key", f"SELECT c.state_key FROM read_parquet('{candidates}') c ANTI JOIN read_parquet('{states}') s USING (state_key) LIMIT 1",
             "candidates of state {!r}, which has no row in the states table"),
        ]
        for file, column, sql, message in checks:
            bad = _first(con, sql)
            if bad is not None:
                raise DigiqError(message.format(bad), file=file, field=column)


# ----------------------------------------------------------------------------- derived sources

def derive_transitions(steps: pa.Table, candidates: Path, event_timestamp: datetime = FEATURE_EPOCH) -> pa.Table:
    """One row per dataset step: state_key, next_state_key, reward, done, mc_return, action, n_candidates.

    next_state_key is the next stored step of the same trajectory, and null when the step is
    terminal (done) or the last stored step of a cut-off episode (no s' was kept).
    """
    with _duckdb() as con:
        con.register("steps", steps.select(["traj_id", "step_id", "reward", "done", "mc_return", "action"]))
        table = con.sql(f"""
            WITH counts AS (
                SELECT state_key, count(DISTINCT cand_idx)::INTEGER AS n_candidates
                FROM read_parquet('{candidates}') GROUP BY state_key)
            SELECT s.traj_id || '/' || s.step_id AS state_key,
                   CASE WHEN s.done OR nx.step_id IS NULL THEN NULL ELSE nx.traj_id || '/' || nx.step_id END AS next_state_key,
                   s.reward, s.done, s.mc_return, s.action, coalesce(c.n_candidates, 0)::INTEGER AS n_candidates
            FROM steps s
            LEFT JOIN steps nx ON nx.traj_id = s.traj_id AND nx.step_id = s.step_id + 1
            LEFT JOIN counts c ON c.state_key = s.traj_id || '/' || s.step_id
            ORDER BY s.traj_id, s.step_id""").to_arrow_table()
    stamps = pa.array([event_timestamp] * table.num_rows, pa.timestamp("us", tz="UTC"))
    return table.append_column("event_timestamp", stamps).cast(TRANSITIONS_SCHEMA)


def derive_candidate_blocks(candidates: Path) -> pa.Table:
    """One row per (state_key, event_timestamp): its K candidate vectors concatenated in cand_idx order, and actions.

    The online store serves a state's candidates from this row: one lookup instead of K.
    """
    with _duckdb() as con:
        table = con.sql(f"""
            SELECT state_key, event_timestamp,
                   flatten(list(embedding::FLOAT[] ORDER BY cand_idx)) AS embeddings,
                   list(action ORDER BY cand_idx) AS actions, count(*)::INTEGER AS n_candidates
            FROM read_parquet('{candidates}') GROUP BY state_key, event_timestamp
            ORDER BY state_key, event_timestamp""").to_arrow_table()
    return table.cast(CANDIDATE_BLOCKS_SCHEMA)


def derive_labels(labels: Path, event_timestamp: datetime = FEATURE_EPOCH) -> pa.Table:
    """The ε-label table keyed by state_key (one row per labelled step)."""
    with _duckdb() as con:
        duplicate = _first(con, f"SELECT traj_id || '/' || step_id FROM read_parquet('{labels}') GROUP BY traj_id, step_id HAVING count(*) > 1 LIMIT 1")
        if duplicate is not None:
            raise DigiqError(f"step {duplicate!r} is labelled twice", file=labels, field="step_id")
        table = con.sql(f"""
            SELECT traj_id || '/' || step_id AS state_key, label, mse::DOUBLE AS mse, epsilon::DOUBLE AS epsilon, action_kind
            FROM read_parquet('{labels}') ORDER BY traj_id, step_id""").to_arrow_table()
    stamps = pa.array([event_timestamp] * table.num_rows, pa.timestamp("us", tz="UTC"))
    return table.append_column("event_timestamp", stamps).cast(DERIVED_LABELS_SCHEMA)


def check_coverage(transitions: pa.Table, labels: pa.Table, states: Path, candidates: Path, labels_path: Path) -> None:
    """Every dataset step has f(s) and at least its dataset action as candidate 0; labels name real steps."""
    with _duckdb() as con:
        con.register("transitions", transitions.select(["state_key", "n_candidates"]))
        con.register("labels", labels.select(["state_key"]))
        total = transitions.num_rows
        missing = con.execute(f"SELECT count(*), min(state_key) FROM transitions t ANTI JOIN read_parquet('{states}') s USING (state_key)").fetchone()
        if missing[0]:
            raise DigiqError(f"no embedding for state {missing[1]!r} ({missing[0]} of {total} dataset steps missing)", file=states, field="state_key")
        missing = con.execute("SELECT count(*), min(state_key) FROM transitions WHERE n_candidates = 0").fetchone()
        if missing[0]:
            raise DigiqError(f"no candidates for state {missing[1]!r} ({missing[0]} of {total} dataset steps missing)", file=candidates, field="state_key")
        stray = _first(con, "SELECT l.state_key FROM labels l ANTI JOIN transitions t USING (state_key) LIMIT 1")
        if stray is not None:
            raise DigiqError(f"label for step {stray!r}, which is not in the dataset", file=labels_path, field="step_id")


# ----------------------------------------------------------------------------- the Feast repository

def runtime_dir(repo: Path, variant: str) -> Path:
    return Path(repo) / "data" / variant


def check_variant(variant: str) -> str:
    if not _VARIANT.fullmatch(variant):
        raise DigiqError(f"{variant!r} is not a variant name (letters, digits, _ . -)", field="features.variant")
    return variant


def load_repo_module(repo: str | Path) -> Any:
    """Import ``<repo>/digiq_feature_repo.py`` (the Feast definitions) under a private module name."""
    path = Path(repo) / REPO_MODULE
    if not path.is_file():
        raise DigiqError("not a digiq Feast repository (no definitions module)", file=path, field="features.repo")
    spec = importlib.util.spec_from_file_location(f"_digiq_feature_repo_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def check_repo(repo: str | Path) -> None:
    """``repo`` holds the definitions module and feature_store.yaml (DigiqError naming the missing one)."""
    for name, what in ((REPO_MODULE, "not a digiq Feast repository (no definitions module)"),
                       ("feature_store.yaml", "not a Feast repository (no feature_store.yaml)")):
        if not (Path(repo) / name).is_file():
            raise DigiqError(what, file=Path(repo) / name, field="features.repo")


def is_sqlite(online: dict[str, Any] | None) -> bool:
    return not online or online.get("type", "sqlite") == "sqlite"


def render_config(repo: Path, registry: Path, online_store: Path, online: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repository's feature_store.yaml with the registry placed at ``registry`` and the online store: SQLite at
    ``online_store``, or ``online`` as given (e.g. ``{type: redis, connection_string: "host:6379"}``; Feast
    validates it)."""
    source = Path(repo) / "feature_store.yaml"
    if not source.is_file():
        raise DigiqError("not a Feast repository (no feature_store.yaml)", file=source, field="features.repo")
    config = _read_yaml(source)
    registry_section = config.get("registry")
    config["registry"] = {**(registry_section if isinstance(registry_section, dict) else {}), "path": str(registry)}
    if is_sqlite(online):
        config["online_store"] = {**config.get("online_store", {}), "path": str(online_store)}
    else:
        config["online_store"] = dict(online)
    return config


def _write_yaml(path: Path, config: dict[str, Any]) -> None:
    import yaml

    header = "# Rendered by `digiq features materialize`: use with `feast -f <this file> ...` inside the repository folder.\n"
    write_text(path, header + yaml.safe_dump(config, sort_keys=False))


@contextlib.contextmanager
def _quiet_feast() -> Iterator[None]:
    """Feast prints per-view progress bars and ibis warns about deprecations: keep the stage's output ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _store(repo: Path, config: dict[str, Any]) -> FeatureStore:
    from feast import FeatureStore, RepoConfig

    return FeatureStore(repo_path=str(repo), config=RepoConfig(repo_path=Path(repo), **config))


def open_store(repo: str | Path = "features", variant: str = "finetuned") -> FeatureStore:
    """The Feast store of ``variant``, as built by `digiq features materialize`."""
    repo, variant = Path(repo).resolve(), check_variant(variant)
    state_dir = runtime_dir(repo, variant)
    online = _rendered_online_store(state_dir)
    for name in ("registry.db", "online_store.db") if is_sqlite(online) else ("registry.db",):
        if not (state_dir / name).is_file():
            raise DigiqError(f"no feature store for variant {variant!r} (run `digiq features materialize --variant {variant}`)",
                             file=state_dir / name)
    with _quiet_feast():
        return _store(repo, render_config(repo, state_dir / "registry.db", state_dir / "online_store.db", online))


def _rendered_online_store(state_dir: Path) -> dict[str, Any] | None:
    """The online store the variant was materialized into (its rendered feature_store.yaml; None: SQLite)."""
    rendered = state_dir / "feature_store.yaml"
    if not rendered.is_file():
        return None
    return (_read_yaml(rendered) or {}).get("online_store")


def _read_yaml(path: Path) -> Any:
    """A Feast YAML file; a syntax error is one DigiqError naming the file, line and column (as for params.yaml)."""
    import yaml

    from digiq.config import yaml_error

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise yaml_error(exc, path) from None


def _timestamp_range(paths: list[Path]) -> tuple[datetime, datetime]:
    """[earliest, latest + 1 s) over every source: the materialization window (from the data, not now())."""
    with _duckdb() as con:
        union = " UNION ALL ".join(f"SELECT min(event_timestamp) AS lo, max(event_timestamp) AS hi FROM read_parquet('{p}')" for p in paths)
        lo, hi = con.execute(f"SELECT min(lo), max(hi) FROM ({union})").fetchone()
    return lo.astimezone(timezone.utc), hi.astimezone(timezone.utc) + timedelta(seconds=1)


def _count_keys(path: Path, key: str) -> int:
    with _duckdb() as con:
        return int(_first(con, f"SELECT count(DISTINCT {key}) FROM read_parquet('{path}')"))


@dataclass
class Inputs:
    """Where the stage reads from (all resolved to absolute paths before Feast sees them)."""

    repo: Path
    variant: str
    states: Path
    candidates: Path
    labels: Path
    dataset: Path
    online_store: dict[str, Any] | None = None  # None / type sqlite: the variant's own SQLite file

    @classmethod
    def from_params(cls, fp: FeaturesParams, *, dataset: str | Path, labels: str | Path) -> Inputs:
        variant = check_variant(fp.variant)
        embeddings = Path(fp.embeddings) / variant
        return cls(repo=Path(fp.repo).resolve(), variant=variant, states=(embeddings / STATES_FILE).resolve(),
                   candidates=(embeddings / CANDIDATES_FILE).resolve(), labels=Path(labels).resolve(),
                   dataset=Path(dataset).resolve(), online_store=fp.online_store)


def materialize(inputs: Inputs, metrics_path: str | Path | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Check the sources, derive transitions and labels, `feast apply`, materialize; return the metrics.

    The registry and online store are built in a temporary folder and moved into
    ``<repo>/data/<variant>/`` only when everything succeeded, so a failed run leaves the last good store.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dims, derived = check_and_derive(inputs)
    timings["check_and_derive_s"] = time.perf_counter() - start
    paths = _write_runtime_sources(inputs, derived)
    timings.update(_build_store(inputs, paths, progress=progress))
    timings["total_s"] = time.perf_counter() - start
    metrics = _metrics(inputs, dims, derived, timings)
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics


def store_dataset(repo: str | Path, variant: str) -> Path:
    """The dataset folder (step tables) the store of ``variant`` was materialized from."""
    manifest = runtime_dir(Path(repo), check_variant(variant)) / "sources.json"
    try:
        return Path(json.loads(manifest.read_text())["dataset"])
    except (OSError, ValueError, KeyError):
        raise DigiqError("does not name the dataset the store was built from (built by an older digiq?): "
                         f"run `digiq features materialize --variant {variant}`", file=manifest, field="dataset") from None


def ensure_store(params: Any, repo: str | Path, variant: str, say: Callable[[str], None] = print) -> bool:
    """Materialize ``variant`` when its registry is missing; True when it did.

    The store's registry and online store are git-ignored run-time state, not DVC outputs: a fresh workspace
    (the temporary copy of a queued `dvc exp run`, a clone after `dvc pull`) has the embeddings but no store,
    and DVC skips the unchanged features stage. The critic and actor stages call this first.
    """
    if (runtime_dir(Path(repo), check_variant(variant)) / "registry.db").is_file():
        return False
    fp = params.features.model_copy(update={"repo": str(repo), "variant": variant})
    say(f"no feature store for variant {variant!r} in this workspace: materializing it from {fp.embeddings}/{variant}")
    materialize(Inputs.from_params(fp, dataset=params.collect.out, labels=params.label.out), progress=False)
    return True


def check_and_derive(inputs: Inputs) -> tuple[dict[str, int], dict[str, pa.Table]]:
    """Validate the four inputs (DigiqError naming file and field) and derive the state-keyed tables
    (transitions, labels, candidate_blocks)."""
    from digiq.store import Dataset

    check_repo(inputs.repo)  # before anything is written under it
    states_schema = check_table(inputs.states, STATES_COLUMNS)
    candidates_schema = check_table(inputs.candidates, CANDIDATES_COLUMNS)
    check_table(inputs.labels, LABELS_COLUMNS)
    dims = {"dim": vector_dim(states_schema), "dim_candidate": vector_dim(candidates_schema)}
    check_recorded_dims(inputs.states, inputs.candidates, dims["dim"], dims["dim_candidate"])
    check_keys(inputs.states, inputs.candidates)
    transitions = derive_transitions(Dataset(inputs.dataset).table(), inputs.candidates)
    labels = derive_labels(inputs.labels)
    check_coverage(transitions, labels, inputs.states, inputs.candidates, inputs.labels)
    return dims, {"transitions": transitions, "labels": labels, "candidate_blocks": derive_candidate_blocks(inputs.candidates)}


def _write_runtime_sources(inputs: Inputs, derived: dict[str, pa.Table]) -> dict[str, str]:
    """Derived Parquet sources, sources.json (read by the definitions module) and a rendered feature_store.yaml."""
    state_dir = runtime_dir(inputs.repo, inputs.variant)
    folder = state_dir.resolve() / "sources"
    paths = {"states": str(inputs.states), "candidates": str(inputs.candidates)}
    for name, table in derived.items():
        paths[name] = str(folder / f"{name}.parquet")
        with atomic_path(paths[name]) as tmp:
            pq.write_table(table, tmp)
    write_json(state_dir / "sources.json", paths | {"dataset": str(inputs.dataset)})
    relative = Path("data") / inputs.variant
    _write_yaml(state_dir / "feature_store.yaml", render_config(inputs.repo, relative / "registry.db", relative / "online_store.db",
                                                                inputs.online_store))
    return paths


def _build_store(inputs: Inputs, paths: dict[str, str], *, progress: bool) -> dict[str, float]:
    """`feast apply` + materialize into a temporary registry/online store, then swap them in."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    import feast  # noqa: F401  (timed on its own: ~3 s)

    timings["import_feast_s"] = time.perf_counter() - t
    state_dir = runtime_dir(inputs.repo, inputs.variant)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=state_dir))
    try:
        with _quiet_feast():
            store = _store(inputs.repo, render_config(inputs.repo, build / "registry.db", build / "online_store.db",
                                                      inputs.online_store))
            objects = load_repo_module(inputs.repo).build(paths)
            t = time.perf_counter()
            store.apply(list(objects.values()))
            timings["apply_s"] = time.perf_counter() - t
        window = _timestamp_range([Path(p) for p in paths.values()])
        online = [name for name in VIEWS if objects[name].online]  # candidate_embedding is offline only
        timings.update(_materialize_views(store, online, window, progress=progress))
        for name in ("online_store.db", "registry.db") if is_sqlite(inputs.online_store) else ("registry.db",):
            os.replace(build / name, state_dir / name)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return timings


def _metrics(inputs: Inputs, dims: dict[str, int], derived: dict[str, pa.Table], timings: dict[str, float]) -> dict[str, Any]:
    transitions = derived["transitions"]
    with _duckdb() as con:
        models = con.execute(f"SELECT DISTINCT model_hash, layer FROM read_parquet('{inputs.states}') ORDER BY ALL").fetchall()
    return {
        "variant": inputs.variant,
        **dims,
        "rows": {
            "state_embedding": _count_keys(inputs.states, "state_key"),
            "candidate_embedding": _count_keys(inputs.candidates, "cand_key"),
            "candidate_block": derived["candidate_blocks"].num_rows,
            "transition": transitions.num_rows,
            "eps_label": derived["labels"].num_rows,
        },
        "candidates_per_state": {
            "min": int(pc.min(transitions["n_candidates"]).as_py()),
            "max": int(pc.max(transitions["n_candidates"]).as_py()),
        },
        "terminal_or_cut_off": int(pc.sum(pc.is_null(transitions["next_state_key"])).as_py()),
        "models": [{"model_hash": h, "layer": layer} for h, layer in models],
        "timings_s": {k.removesuffix("_s"): round(v, 3) for k, v in timings.items()},
    }


def _materialize_views(store: FeatureStore, views: list[str], window: tuple[datetime, datetime], *,
                       progress: bool) -> dict[str, float]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    timings: dict[str, float] = {}
    columns = [TextColumn("materialize {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} views"), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("", total=len(views))
        for view in views:
            bar.update(task, description=view)
            t = time.perf_counter()
            with _quiet_feast():
                store.materialize(window[0], window[1], feature_views=[view])
            timings[f"materialize_{view}_s"] = time.perf_counter() - t
            bar.advance(task)
    return timings


# ----------------------------------------------------------------------------- online reads

def state_key(traj_id: str, step_id: int) -> str:
    return f"{traj_id}/{step_id}"


def _online(store: FeatureStore, refs: list[str], entities: dict[str, list[str]]) -> dict[str, list[Any]]:
    """get_online_features as feature name → protobuf values (None where not found).

    Embeddings are turned into arrays straight from the protobuf (:func:`_vectors`): ~10× faster
    than Feast's ``to_dict`` (one Python float per element), which matters for K·d numbers per read.
    """
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    response = store.get_online_features(refs, entities).proto
    return {name: [value if status == FieldStatus.PRESENT else None for value, status in zip(result.values, result.statuses)]
            for name, result in zip(response.metadata.feature_names.val, response.results)}


def _vectors(values: list[Any]) -> np.ndarray:
    """Present Array(Float32) values as a float32 [n, d] matrix (bit-exact)."""
    return np.array([value.float_list_val.val for value in values], dtype=np.float32)


def _scalars(values: list[Any]) -> list[Any]:
    from feast.type_map import feast_value_type_to_python_type

    return [None if value is None else feast_value_type_to_python_type(value) for value in values]


def _candidate_rows(found: dict[str, list[Any]], key: str) -> dict[str, Any]:
    """A state's candidate_block as cand_idx, action and embedding [K, d]."""
    if found["embeddings"][0] is None:
        raise DigiqError(f"no candidates online for state {key!r} (not in the dataset, or not materialized)", field="state_key")
    actions = list(found["actions"][0].string_list_val.val)
    flat = np.array(found["embeddings"][0].float_list_val.val, dtype=np.float32)
    return {"cand_idx": list(range(len(actions))), "action": actions, "embedding": flat.reshape(len(actions), -1)}


def online_candidates(store: FeatureStore, key: str) -> dict[str, Any]:
    """The candidates of state ``key`` from the online store (one lookup): cand_idx, action, embedding [K, d]."""
    return _candidate_rows(_online(store, CANDIDATE_REFS, {"state_key": [key]}), key)


def online_state(store: FeatureStore, traj_id: str, step_id: int, *, candidates: bool = False) -> dict[str, Any]:
    """One state's online features (embedding as float32 array); with ``candidates`` its K candidates too (same lookup)."""
    key = state_key(traj_id, step_id)
    found = _online(store, STATE_REFS + (CANDIDATE_REFS if candidates else []), {"state_key": [key]})
    if found["embedding"][0] is None:
        raise DigiqError(f"no features online for state {key!r} (not in the dataset, or not materialized)", field="state_key")
    names = [ref.split(":")[1] for ref in STATE_REFS]
    row = {"state_key": key, "embedding": _vectors(found["embedding"])[0]}
    row.update({name: _scalars(found[name])[0] for name in names if name != "embedding"})
    if candidates:
        row["candidates"] = _candidate_rows(found, key)
    return row


# ----------------------------------------------------------------------------- training sets

@dataclass
class TrainingFrame:
    """The critic's training set, one row per transition (rows in the entity frame's order)."""

    state_key: np.ndarray          # [N] str
    state: np.ndarray              # [N, d] float32  f(s)
    action: np.ndarray             # [N, d] float32  f(s, a_data) = candidate 0
    next_state: np.ndarray         # [N, d] float32  f(s'); zeros where has_next is False
    has_next: np.ndarray           # [N] bool  False on terminal steps and on the cut-off last step of a truncated episode
    reward: np.ndarray             # [N] float64
    done: np.ndarray               # [N] bool
    mc_return: np.ndarray          # [N] float64  discounted return (dataset γ)
    candidates: np.ndarray         # [N, K, d] float32  f(s, a_k), k = 0 the dataset action; zeros where masked
    candidate_mask: np.ndarray     # [N, K] bool  False past a state's own number of candidates
    candidate_actions: np.ndarray  # [N, K] object  AutoUI strings (None where masked)
    label: np.ndarray              # [N] object  ε-label "Yes"/"No" (None where unlabelled, e.g. terminal steps)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.state_key)


def _entity_frame(store: FeatureStore, entity_df: pd.DataFrame | None, as_of: datetime) -> pd.DataFrame:
    """state_key + event_timestamp + row_id (Feast reorders rows: row_id puts them back)."""
    import pandas as pd

    if entity_df is None:
        source = store.get_feature_view("transition").batch_source.path
        entity_df = pq.read_table(source, columns=["state_key"]).to_pandas()
    frame = pd.DataFrame(index=range(len(entity_df)))
    if "state_key" in entity_df.columns:
        frame["state_key"] = entity_df["state_key"].astype(str).to_numpy()
    elif {"traj_id", "step_id"} <= set(entity_df.columns):
        frame["state_key"] = (entity_df["traj_id"].astype(str) + "/" + entity_df["step_id"].astype(int).astype(str)).to_numpy()
    else:
        raise DigiqError("entity frame needs a state_key column or traj_id and step_id", field="entity_df")
    stamps = entity_df["event_timestamp"].to_numpy() if "event_timestamp" in entity_df.columns else as_of
    frame["event_timestamp"] = pd.to_datetime(stamps, utc=True)
    frame["row_id"] = np.arange(len(frame), dtype=np.int64)
    return frame


def check_offline_sources(store: FeatureStore) -> None:
    """The Parquet sources the registry points at still exist (moved or deleted since `digiq features materialize`?)."""
    for view in VIEWS:
        source = Path(store.get_feature_view(view).batch_source.path)
        if not source.is_file():
            raise DigiqError("source file is missing (moved or deleted since `digiq features materialize`? run it again)",
                             file=source, field=view)


def _historical(store: FeatureStore, entities: pd.DataFrame, refs: list[str]) -> pa.Table:
    """get_historical_features, rows back in row_id order."""
    with _quiet_feast():
        table = store.get_historical_features(entity_df=entities, features=refs, full_feature_names=True).to_arrow()
    return table.take(pc.sort_indices(table["row_id"]))


def _matrix(column: pa.ChunkedArray, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A list<float> column as a float32 [N, d] matrix (zeros for nulls) and its validity mask."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = np.asarray(column.is_valid())
    lengths = np.asarray(pc.list_value_length(column).fill_null(0))
    dim = dim if dim is not None else int(lengths[valid][0]) if valid.any() else 0
    if (lengths[valid] != dim).any():
        raise DigiqError(f"embedding lengths differ from {dim}", field="embedding")
    matrix = np.zeros((len(column), dim), dtype=np.float32)
    if valid.any():
        matrix[valid] = np.asarray(pc.list_flatten(column), dtype=np.float32).reshape(-1, dim)
    return matrix, valid


def _require(valid: np.ndarray, keys: np.ndarray, what: str, source: str, field: str) -> None:
    if not valid.all():
        bad = np.flatnonzero(~valid)
        raise DigiqError(f"no {what} for {keys[bad[0]]!r} ({len(bad)} of {len(valid)} rows)", file=source, field=field)


def training_frame(store: FeatureStore, entity_df: pd.DataFrame | None = None, *, as_of: datetime = AS_OF) -> TrainingFrame:
    """The critic's training set from the offline store (point-in-time joins in DuckDB).

    ``entity_df``: rows with ``state_key`` (or ``traj_id`` and ``step_id``) and optionally
    ``event_timestamp`` (default ``as_of``); None takes every dataset step. Three
    ``get_historical_features`` calls: state features (f(s), r, done, mc_return, s' key, label),
    next-state embeddings, and the N·K candidate embeddings, reshaped to [N, K, d].
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    check_offline_sources(store)
    entities = _entity_frame(store, entity_df, as_of)
    keys = entities["state_key"].to_numpy()
    states = _historical(store, entities, STATE_REFS)
    timings["state_features_s"] = time.perf_counter() - t
    state, valid = _matrix(states["state_embedding__embedding"])
    _require(valid, keys, "state embedding", store.get_feature_view("state_embedding").batch_source.path, "state_key")
    n_cands = np.asarray(states["transition__n_candidates"].fill_null(0), dtype=np.int64)
    _require(n_cands > 0, keys, "transition (or no candidates)", store.get_feature_view("transition").batch_source.path, "state_key")
    dim = state.shape[1]

    t = time.perf_counter()
    next_keys = states["transition__next_state_key"].to_numpy(zero_copy_only=False)
    has_next = np.array([k is not None for k in next_keys], dtype=bool)
    next_state = np.zeros_like(state)
    if has_next.any():
        nxt = entities[has_next].assign(state_key=next_keys[has_next])
        found, valid = _matrix(_historical(store, nxt, ["state_embedding:embedding"])["state_embedding__embedding"], dim)
        _require(valid, next_keys[has_next], "next-state embedding", store.get_feature_view("state_embedding").batch_source.path, "state_key")
        next_state[has_next] = found
    timings["next_state_s"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates, mask, actions = _candidate_block(store, entities, n_cands)
    timings["candidates_s"] = time.perf_counter() - t
    return TrainingFrame(
        state_key=keys, state=state, action=candidates[:, 0].copy(), next_state=next_state, has_next=has_next,
        reward=np.asarray(states["transition__reward"], dtype=np.float64),
        done=np.asarray(states["transition__done"], dtype=bool),
        mc_return=np.asarray(states["transition__mc_return"], dtype=np.float64),
        candidates=candidates, candidate_mask=mask, candidate_actions=actions,
        label=np.asarray(states["eps_label__label"].to_pylist(), dtype=object), timings=timings,
    )


def _candidate_block(store: FeatureStore, entities: pd.DataFrame, n_cands: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All candidates of all rows in one get_historical_features call, scattered into [N, K, d_sa]."""
    import pandas as pd

    k_max = int(n_cands.max()) if len(n_cands) else 0
    rows = np.repeat(np.arange(len(entities)), n_cands)
    idx = np.arange(len(rows)) - np.repeat(np.cumsum(n_cands) - n_cands, n_cands)
    keys = entities["state_key"].to_numpy()[rows]
    cand_entities = pd.DataFrame({
        "cand_key": [f"{k}/{i}" for k, i in zip(keys, idx)],
        "event_timestamp": entities["event_timestamp"].to_numpy()[rows],
        "row_id": rows * k_max + idx,
    })
    table = _historical(store, cand_entities, ["candidate_embedding:embedding", "candidate_embedding:action"])
    flat, valid = _matrix(table["candidate_embedding__embedding"])
    dim = flat.shape[1]
    _require(valid, cand_entities["cand_key"].to_numpy(), "candidate embedding",
             store.get_feature_view("candidate_embedding").batch_source.path, "cand_key")
    candidates = np.zeros((len(entities) * k_max, dim), dtype=np.float32)
    mask = np.zeros(len(entities) * k_max, dtype=bool)
    actions = np.full(len(entities) * k_max, None, dtype=object)
    slots = np.asarray(table["row_id"])
    candidates[slots], mask[slots] = flat, True
    actions[slots] = table["candidate_embedding__action"].to_pylist()
    return candidates.reshape(len(entities), k_max, dim), mask.reshape(len(entities), k_max), actions.reshape(len(entities), k_max)


# ----------------------------------------------------------------------------- synthetic sources (tests, benchmark, docs)

def write_synthetic_sources(root: str | Path, *, n_states: int = 40, k: int = 64, dim: int = 384, max_len: int = 6,
                            variant: str = "finetuned", seed: int = 0, gamma: float = 0.95,
                            dim_candidate: int | None = None) -> dict[str, Path]:
    """A data/ folder with exactly the embed/label/collect contracts (random vectors, fixed seed).

    Writes ``raw/`` (a digiq dataset of ~n_states steps: trajectories of 1..max_len steps, half
    ending in success, half cut off), ``labels.parquet`` (non-terminal steps) and
    ``embeddings/<variant>/{states,candidates,embedding.json}`` (f(s, a) of size ``dim_candidate``, default ``dim``).
    """
    from digiq.actions import format_action
    from digiq.schema import Action, Step, Trajectory
    from digiq.store import Dataset, DatasetWriter

    root = Path(root)
    dim_candidate = dim_candidate or dim
    rng = np.random.default_rng(seed)
    writer = DatasetWriter(root / "raw", gamma=gamma, source="synthetic")
    shot, sha = writer.put_image(np.zeros((4, 4, 3), dtype=np.uint8))
    pool = [format_action(Action.tap(round(float(y), 4), round(float(x), 4))) for y, x in rng.random((256, 2))]
    trajectories, lengths = [], []
    while sum(lengths) < n_states:
        lengths.append(int(min(rng.integers(1, max_len + 1), n_states - sum(lengths))))
    for t, length in enumerate(lengths):
        success = bool(rng.random() < 0.5)
        steps = [Step(traj_id=f"traj{t:05d}", step_id=s, task="synthetic", goal="g", observation="o",
                      screenshot=shot, screenshot_sha256=sha, action=Action.tap(0.5, 0.5),
                      reward=float(success and s == length - 1), done=success and s == length - 1)
                 for s in range(length)]
        trajectories.append(Trajectory(traj_id=f"traj{t:05d}", task="synthetic", goal="g", steps=steps))
    writer.write_shard("synthetic", trajectories)
    writer.finalize()
    steps_table = Dataset(root / "raw").table()
    traj = np.asarray(steps_table["traj_id"].to_pylist(), dtype=object)
    step = np.asarray(steps_table["step_id"], dtype=np.int32)
    done = np.asarray(steps_table["done"], dtype=bool)
    n = len(traj)
    keys = np.array([f"{a}/{b}" for a, b in zip(traj, step)], dtype=object)
    stamps = pa.array([FEATURE_EPOCH + timedelta(seconds=i) for i in range(n)], pa.timestamp("us", tz="UTC"))

    def vectors(count: int, dim: int = dim) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(count * dim, dtype=np.float32)), dim)

    meta = {"model_hash": pa.array(["synthetic0"] * n), "layer": pa.array(np.full(n, 4, dtype=np.int32))}
    states = pa.table({"state_key": keys, "traj_id": traj, "step_id": step, "event_timestamp": stamps,
                       "embedding": vectors(n), **meta})
    rows = np.repeat(np.arange(n), k)
    idx = np.tile(np.arange(k, dtype=np.int32), n)
    actions = [pool[i] for i in rng.integers(0, len(pool), n * k)]
    for i in range(n):  # candidate 0 is the dataset action
        actions[i * k] = steps_table["action"][i].as_py()
    candidates = pa.table({
        "cand_key": [f"{keys[r]}/{i}" for r, i in zip(rows, idx)], "state_key": keys[rows], "traj_id": traj[rows],
        "step_id": step[rows], "cand_idx": idx, "action": actions, "event_timestamp": stamps.take(rows),
        "embedding": vectors(n * k, dim_candidate), "model_hash": meta["model_hash"].take(rows), "layer": meta["layer"].take(rows),
    })
    keep = ~done  # terminal transitions carry no ε-label (DESIGN §6: MiniWoB's black final frame)
    mse = rng.uniform(0.0, 80.0, int(keep.sum()))
    labels = pa.table({"traj_id": traj[keep], "step_id": step[keep], "action_kind": ["tap"] * len(mse), "mse": mse,
                       "label": np.where(mse > 30.0, "Yes", "No"), "epsilon": np.full(len(mse), 30.0),
                       "scale": np.full(len(mse), 0.25)})
    out = {"dataset": root / "raw", "labels": root / "labels.parquet",
           "states": root / "embeddings" / variant / STATES_FILE,
           "candidates": root / "embeddings" / variant / CANDIDATES_FILE}
    for name, tab in (("labels", labels), ("states", states), ("candidates", candidates)):
        out[name].parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out[name]) as tmp:
            pq.write_table(tab, tmp)
    write_json(out["states"].parent / MANIFEST_FILE, {"dim_state": dim, "dim_candidate": dim_candidate, "variant": variant})
    return out
