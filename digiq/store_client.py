"""The feature store client: the one module that talks to Feast (imported inside functions: ``import feast`` is slow).

    from digiq.store_client import open_store, training_frame, online_state

    store = open_store("features", variant="finetuned")    # the store `digiq features materialize` built
    frame = training_frame(store)                           # the critic's training set, point-in-time correct
    row = online_state(store, "TRAJ_ID", 0, candidates=True)

Stages that only need training sets read the offline store straight from its sources (:func:`offline_store`: the
definitions registered in a throw-away registry), so they depend on the Parquet files DVC tracks, never on the
run-time registry. Keys, views and schemas are :mod:`digiq.feature_contract`'s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from digiq import feature_contract as fc
from digiq.channels import STATE_CHANNELS
from digiq.errors import DigiqError

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

REPO_MODULE = "digiq_feature_repo.py"
STORE_CONFIG = "feature_store.yaml"
STATE_REFS = fc.refs("state_embedding", "transition", "eps_label")
CANDIDATE_REFS = fc.refs("candidate_block")


# ----------------------------------------------------------------------------- the Feast repository

def check_repo(repo: str | Path) -> None:
    """``repo`` holds the definitions module and feature_store.yaml (DigiqError naming the missing one)."""
    for name, what in ((REPO_MODULE, "not a digiq Feast repository (no definitions module)"),
                       (STORE_CONFIG, "not a Feast repository (no feature_store.yaml)")):
        if not (Path(repo) / name).is_file():
            raise DigiqError(what, file=Path(repo) / name, field="features.repo")


def load_repo_module(repo: str | Path) -> Any:
    """Import ``<repo>/digiq_feature_repo.py`` (the Feast definitions) under a private module name."""
    check_repo(repo)
    path = Path(repo) / REPO_MODULE
    spec = importlib.util.spec_from_file_location(f"_digiq_feature_repo_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def read_yaml(path: Path) -> Any:
    """A Feast YAML file; a syntax error is one DigiqError naming the file, line and column (as for params.yaml)."""
    import yaml

    from digiq.params_file import yaml_error

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise yaml_error(exc, path) from None


def is_sqlite(online: dict[str, Any] | None) -> bool:
    return not online or online.get("type", "sqlite") == "sqlite"


def render_config(repo: Path, registry: Path, online_store: Path, online: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repository's feature_store.yaml with the registry placed at ``registry`` and the online store: SQLite at
    ``online_store``, or ``online`` as given (e.g. ``{type: redis, connection_string: "host:6379"}``; Feast validates it)."""
    source = Path(repo) / STORE_CONFIG
    if not source.is_file():
        raise DigiqError("not a Feast repository (no feature_store.yaml)", file=source, field="features.repo")
    config = read_yaml(source)
    registry_section = config.get("registry")
    config["registry"] = {**(registry_section if isinstance(registry_section, dict) else {}), "path": str(registry)}
    if is_sqlite(online):
        config["online_store"] = {**config.get("online_store", {}), "path": str(online_store)}
    else:
        config["online_store"] = dict(online)
    return config


@contextlib.contextmanager
def quiet_feast() -> Iterator[None]:
    """Feast prints per-view progress bars and ibis warns about deprecations: keep the stage's output ours."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def feature_store(repo: Path, config: dict[str, Any]) -> FeatureStore:
    from feast import FeatureStore, RepoConfig

    with quiet_feast():
        return FeatureStore(repo_path=str(repo), config=RepoConfig(repo_path=Path(repo), **config))


def apply_definitions(repo: Path, paths: dict[str, str], state_dir: Path,
                      online: dict[str, Any] | None = None) -> tuple[FeatureStore, dict[str, Any], dict[str, float]]:
    """Register the repository's definitions over the sources ``paths`` in a registry (and online store, SQLite unless
    ``online`` names another) under ``state_dir``: the store, its objects by name, and the import and apply times."""
    started = time.perf_counter()
    import feast  # noqa: F401  (timed on its own)

    timings = {"import_feast_s": time.perf_counter() - started}
    store = feature_store(repo, render_config(repo, state_dir / "registry.db", state_dir / "online_store.db", online))
    objects = load_repo_module(repo).build(paths)
    started = time.perf_counter()
    with quiet_feast():
        store.apply(list(objects.values()))
    timings["apply_s"] = time.perf_counter() - started
    return store, objects, timings


def open_store(repo: str | Path = "features", variant: str = "finetuned") -> FeatureStore:
    """The Feast store of ``variant``, as built by `digiq features materialize` (online and offline reads)."""
    repo, state_dir = Path(repo).resolve(), fc.runtime_dir(Path(repo).resolve(), variant)
    online = _rendered_online_store(state_dir)
    for name in ("registry.db", "online_store.db") if is_sqlite(online) else ("registry.db",):
        if not (state_dir / name).is_file():
            raise DigiqError(f"no feature store for variant {variant!r} (run `digiq features materialize --variant {variant}`)",
                             file=state_dir / name)
    return feature_store(repo, render_config(repo, state_dir / "registry.db", state_dir / "online_store.db", online))


@contextlib.contextmanager
def offline_store(repo: str | Path, paths: dict[str, str]) -> Iterator[FeatureStore]:
    """A store reading the sources ``paths`` offline (training sets only), its definitions registered in a temporary
    folder: what it serves is exactly those files."""
    check_repo(repo)
    for name, path in paths.items():
        if name in fc.CHANNEL_SOURCES and not Path(path).is_file():
            raise DigiqError(f"missing channel source {name!r} (run `digiq channels` first)", file=path, field="channels.out")
        if not Path(path).is_file():
            raise DigiqError(f"missing feature source {name!r} (run `digiq features materialize` first)", file=path,
                             field="features.derived" if name in fc.DERIVED else "features.embeddings")
    folder = Path(tempfile.mkdtemp(prefix="digiq-offline-store-"))
    try:
        yield apply_definitions(Path(repo).resolve(), paths, folder)[0]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rendered_online_store(state_dir: Path) -> dict[str, Any] | None:
    """The online store the variant was materialized into (its rendered feature_store.yaml; None: SQLite)."""
    rendered = state_dir / STORE_CONFIG
    return (read_yaml(rendered) or {}).get("online_store") if rendered.is_file() else None


# ----------------------------------------------------------------------------- online reads

def _online(store: FeatureStore, refs: list[str], entities: dict[str, list[str]]) -> dict[str, list[Any]]:
    """get_online_features as feature name → protobuf values (None where not found). Embeddings are turned into
    arrays straight from the protobuf: much faster than Feast's ``to_dict`` (one Python float per element)."""
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    response = store.get_online_features(refs, entities).proto
    return {name: [value if status == FieldStatus.PRESENT else None for value, status in zip(result.values, result.statuses)]
            for name, result in zip(response.metadata.feature_names.val, response.results)}


def _scalars(values: list[Any]) -> list[Any]:
    from feast.type_map import feast_value_type_to_python_type

    return [None if value is None else feast_value_type_to_python_type(value) for value in values]


def _candidate_rows(found: dict[str, list[Any]], key: str) -> dict[str, Any]:
    """A state's candidate_block as cand_idx, action, semantic_key, draws and embedding [K, d]."""
    if found["embeddings"][0] is None:
        raise DigiqError(f"no candidates online for state {key!r} (not in the dataset, or not materialized)", field="state_key")
    actions = list(found["actions"][0].string_list_val.val)
    flat = np.array(found["embeddings"][0].float_list_val.val, dtype=np.float32)
    return {"cand_idx": list(range(len(actions))), "action": actions,
            "semantic_key": list(found["semantic_keys"][0].string_list_val.val),
            "draws": list(found["draws"][0].int32_list_val.val), "embedding": flat.reshape(len(actions), -1)}


def online_candidates(store: FeatureStore, key: str) -> dict[str, Any]:
    """The candidates of state ``key`` from the online store (one lookup): cand_idx, action, semantic_key, draws,
    embedding [K, d]."""
    return _candidate_rows(_online(store, CANDIDATE_REFS, {"state_key": [key]}), key)


def online_state(store: FeatureStore, traj_id: str, step_id: int, *, candidates: bool = False) -> dict[str, Any]:
    """One state's online features (embedding as float32 array); with ``candidates`` its K candidates too (same lookup)."""
    key = fc.state_key(traj_id, step_id)
    found = _online(store, STATE_REFS + (CANDIDATE_REFS if candidates else []), {"state_key": [key]})
    if found["embedding"][0] is None:
        raise DigiqError(f"no features online for state {key!r} (not in the dataset, or not materialized)", field="state_key")
    row = {"state_key": key, "embedding": np.array(found["embedding"][0].float_list_val.val, dtype=np.float32)}
    row.update({name: _scalars(found[name])[0] for name in (ref.split(":")[1] for ref in STATE_REFS) if name != "embedding"})
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
    candidates: np.ndarray         # [N, K] + [d] float32  f(s, a_k), k = 0 the dataset action; zeros where masked
    candidate_mask: np.ndarray     # [N, K] bool  False past a state's own number of candidates
    candidate_actions: np.ndarray  # [N, K] object  AutoUI strings (None where masked)
    candidate_draws: np.ndarray    # [N, K] int64  π_β draws a candidate stands for; 0 on a repeat and where masked
    label: np.ndarray              # [N] object  ε-label "Yes"/"No" (None where unlabelled, e.g. terminal steps)
    timings: dict[str, float] = field(default_factory=dict)
    channels: dict[str, np.ndarray] = field(default_factory=dict)       # STATE_CHANNELS [N, d]; action [N, K, d] (zeros where masked); empty without channel views
    next_channels: dict[str, np.ndarray] = field(default_factory=dict)  # STATE_CHANNELS of s' [N, d]; zeros where has_next is False

    def __len__(self) -> int:
        return len(self.state_key)


def _entity_frame(store: FeatureStore, entity_df: pd.DataFrame | None, as_of: datetime) -> pd.DataFrame:
    """state_key + event_timestamp + row_id (Feast reorders rows: row_id puts them back)."""
    import pandas as pd

    if entity_df is None:
        entity_df = pq.read_table(store.get_feature_view("transition").batch_source.path, columns=["state_key"]).to_pandas()
    frame = pd.DataFrame(index=range(len(entity_df)))
    if "state_key" in entity_df.columns:
        frame["state_key"] = entity_df["state_key"].astype(str).to_numpy()
    elif {"traj_id", "step_id"} <= set(entity_df.columns):
        frame["state_key"] = [fc.state_key(t, s) for t, s in zip(entity_df["traj_id"].astype(str), entity_df["step_id"])]
    else:
        raise DigiqError("entity frame needs a state_key column or traj_id and step_id", field="entity_df")
    stamps = entity_df["event_timestamp"].to_numpy() if "event_timestamp" in entity_df.columns else as_of
    frame["event_timestamp"] = pd.to_datetime(stamps, utc=True)
    frame["row_id"] = np.arange(len(frame), dtype=np.int64)
    return frame


def registered_views(store: FeatureStore) -> tuple[fc.View, ...]:
    """The contract's views the store registered (the channel views only where their sources were given)."""
    names = {view.name for view in store.list_feature_views()}
    return tuple(view for view in fc.VIEWS if view.name in names)


def has_channels(store: FeatureStore) -> bool:
    """Whether the store serves the critic's channel views (`digiq channels` ran and was materialized)."""
    return any(view.source in fc.CHANNEL_SOURCES for view in registered_views(store))


def online_channels(store: FeatureStore, traj_id: str, step_id: int) -> dict[str, np.ndarray]:
    """A dataset step's state channels from the online store (STATE_CHANNELS; float32 vectors)."""
    key = fc.state_key(traj_id, step_id)
    found = _online(store, [f"{fc.CHANNEL_VIEWS[name]}:{name}" for name in STATE_CHANNELS], {"state_key": [key]})
    if any(found[name][0] is None for name in STATE_CHANNELS):
        raise DigiqError(f"no channels online for state {key!r} (not in the dataset, or `digiq channels` not materialized)",
                         field="state_key")
    return {name: np.array(found[name][0].float_list_val.val, dtype=np.float32) for name in STATE_CHANNELS}


def check_offline_sources(store: FeatureStore) -> None:
    """The Parquet sources the registry points at still exist (moved or deleted since `digiq features materialize`?)."""
    for view in registered_views(store):
        source = Path(store.get_feature_view(view.name).batch_source.path)
        if not source.is_file():
            raise DigiqError("source file is missing (moved or deleted since `digiq features materialize`? run it again)",
                             file=source, field=view.name)


def _historical(store: FeatureStore, entities: pd.DataFrame, refs: list[str]) -> pa.Table:
    """get_historical_features, rows back in row_id order."""
    with quiet_feast():
        table = store.get_historical_features(entity_df=entities, features=refs, full_feature_names=True).to_arrow()
    return table.take(pc.sort_indices(table["row_id"]))


def _matrix(column: pa.ChunkedArray | pa.Array, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
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


def _padded(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A list<int> column as an int64 [N, width] matrix, each row's list left-aligned, zeros after it."""
    lists = column.combine_chunks()
    lengths = np.asarray(pc.list_value_length(lists).fill_null(0), dtype=np.int64)
    out = np.zeros((len(lists), width), dtype=np.int64)
    out[np.arange(width) < lengths[:, None]] = np.asarray(pc.list_flatten(lists), dtype=np.int64)  # null lists add nothing
    return out


def _require(valid: np.ndarray, keys: np.ndarray, what: str, source: str, field: str) -> None:
    if not valid.all():
        bad = np.flatnonzero(~valid)
        raise DigiqError(f"no {what} for {keys[bad[0]]!r} ({len(bad)} of {len(valid)} rows)", file=source, field=field)


def training_frame(store: FeatureStore, entity_df: pd.DataFrame | None = None, *, as_of: datetime = fc.AS_OF) -> TrainingFrame:
    """The critic's training set from the offline store (point-in-time joins in DuckDB).

    ``entity_df``: rows with ``state_key`` (or ``traj_id`` and ``step_id``) and optionally ``event_timestamp``
    (default ``as_of``); None takes every dataset step. Three ``get_historical_features`` calls: state features
    (f(s), r, done, mc_return, s' key, label, the candidates' draws), next-state embeddings, and the N·K candidate
    embeddings, reshaped to [N, K, d]."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    check_offline_sources(store)
    source = {view.name: store.get_feature_view(view.name).batch_source.path for view in registered_views(store)}
    channel_refs = [f"{fc.CHANNEL_VIEWS[name]}:{name}" for name in STATE_CHANNELS] if "image_channel" in source else []
    entities = _entity_frame(store, entity_df, as_of)
    keys = entities["state_key"].to_numpy()
    states = _historical(store, entities, STATE_REFS + ["candidate_block:draws"] + channel_refs)
    timings["state_features_s"] = time.perf_counter() - t
    state, valid = _matrix(states["state_embedding__embedding"])
    _require(valid, keys, "state embedding", source["state_embedding"], "state_key")
    n_cands = np.asarray(states["transition__n_candidates"].fill_null(0), dtype=np.int64)
    _require(n_cands > 0, keys, "transition (or no candidates)", source["transition"], "state_key")

    t = time.perf_counter()
    next_keys = states["transition__next_state_key"].to_numpy(zero_copy_only=False)
    has_next = np.array([k is not None for k in next_keys], dtype=bool)
    next_state = np.zeros_like(state)
    channels = _channel_matrices(states, keys, channel_refs, source)
    next_channels = {name: np.zeros_like(matrix) for name, matrix in channels.items()}
    if has_next.any():
        nxt = entities[has_next].assign(state_key=next_keys[has_next])
        table = _historical(store, nxt, ["state_embedding:embedding"] + channel_refs)
        found, valid = _matrix(table["state_embedding__embedding"], state.shape[1])
        _require(valid, next_keys[has_next], "next-state embedding", source["state_embedding"], "state_key")
        next_state[has_next] = found
        for name, matrix in _channel_matrices(table, next_keys[has_next], channel_refs, source).items():
            next_channels[name][has_next] = matrix
    timings["next_state_s"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates, mask, actions = _candidate_block(store, entities, n_cands)
    if channel_refs:
        channels["action"] = _action_channel(store, entities, mask)
    timings["candidates_s"] = time.perf_counter() - t
    return TrainingFrame(
        state_key=keys, state=state, action=candidates[:, 0].copy(), next_state=next_state, has_next=has_next,
        reward=np.asarray(states["transition__reward"], dtype=np.float64),
        done=np.asarray(states["transition__done"], dtype=bool),
        mc_return=np.asarray(states["transition__mc_return"], dtype=np.float64),
        candidates=candidates, candidate_mask=mask, candidate_actions=actions,
        candidate_draws=_padded(states["candidate_block__draws"], mask.shape[1]) * mask,
        label=np.asarray(states["eps_label__label"].to_pylist(), dtype=object), timings=timings,
        channels=channels, next_channels=next_channels,
    )


def _channel_matrices(table: pa.Table, keys: np.ndarray, refs: list[str], source: dict[str, str]) -> dict[str, np.ndarray]:
    """The state channels of a historical-features table as float32 [N, d] by channel name (every row must have them)."""
    out = {}
    for ref in refs:
        view, name = ref.split(":")
        out[name], valid = _matrix(table[f"{view}__{name}"])
        _require(valid, keys, f"{name} channel (re-run `digiq channels`)", source[view], "state_key")
    return out


def _action_channel(store: FeatureStore, entities: pd.DataFrame, mask: np.ndarray) -> np.ndarray:
    """The action channel of every valid candidate, [N, K, d] (zeros where masked), in one historical call."""
    import pandas as pd

    rows, idx = np.nonzero(mask)
    keys = entities["state_key"].to_numpy()[rows]
    cand = pd.DataFrame({"cand_key": [fc.cand_key(k, i) for k, i in zip(keys, idx)],
                         "event_timestamp": entities["event_timestamp"].to_numpy()[rows], "row_id": np.arange(len(rows))})
    flat, valid = _matrix(_historical(store, cand, ["action_channel:action"])["action_channel__action"])
    _require(valid, cand["cand_key"].to_numpy(), "action channel (re-run `digiq channels`)",
             store.get_feature_view("action_channel").batch_source.path, "cand_key")
    out = np.zeros((*mask.shape, flat.shape[1]), dtype=np.float32)
    out[rows, idx] = flat
    return out


def _candidate_block(store: FeatureStore, entities: pd.DataFrame, n_cands: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All candidates of all rows in one get_historical_features call, scattered into [N, K, d_sa]."""
    import pandas as pd

    k_max = int(n_cands.max()) if len(n_cands) else 0
    rows = np.repeat(np.arange(len(entities)), n_cands)
    idx = np.arange(len(rows)) - np.repeat(np.cumsum(n_cands) - n_cands, n_cands)
    keys = entities["state_key"].to_numpy()[rows]
    cand_entities = pd.DataFrame({
        "cand_key": [fc.cand_key(k, i) for k, i in zip(keys, idx)],
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
