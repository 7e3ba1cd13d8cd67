"""digiq's Feast definitions: two entities, five feature views (nine with the critic's channels), two feature services (three), all from the feature contract.

    entity     join key   keyed rows
    state      state_key  f"{traj_id}/{step_id}"             one per dataset step
    candidate  cand_key   f"{traj_id}/{step_id}/{cand_idx}"  K per step, cand_idx 0 = the dataset action

    view                 entity     source (Parquet)                                 features
    state_embedding      state      data/embeddings/<variant>/states.parquet       embedding f(s), model_hash, layer
    candidate_embedding  candidate  data/embeddings/<variant>/candidates.parquet   embedding f(s, a), action, cand_idx, ... (offline only)
    candidate_block      state      data/features/<variant>/candidate_blocks       embeddings [K·d], actions, semantic_keys, draws [K]
    transition           state      data/features/<variant>/transitions            next_state_key, reward, done, mc_return, action, n_candidates
    eps_label            state      data/features/<variant>/labels                 label (Yes/No), mse, epsilon, action_kind
    image_channel        state      data/channels/states.parquet                   image v(s) ⊕ v(s_prev)
    goal_channel         state      data/channels/states.parquet                   goal e(goal)
    prev_action_channel  state      data/channels/states.parquet                   prev_action e(type) ⊕ e(text), prev_type, prev_text
    action_channel       candidate  data/channels/candidates.parquet               action e(type) ⊕ e(text), action_type, action_text (offline only)

The four channel views (the official critic's extra inputs, ``digiq/channels.py``) are declared when their sources
are among the paths (``digiq channels`` wrote them, shared by every variant).

Views, their columns and types are declared once, in ``digiq/feature_contract.py`` (``VIEWS``, ``source_schemas``);
this module translates them into Feast objects. ``candidate_block`` holds the same vectors as
``candidate_embedding``, one row per state, so that online reads of a state's candidates are one lookup instead of
K; ``candidate_embedding`` serves point-in-time training sets only.

Paths are resolved when this module is imported, never committed: DuckDB reads a FileSource path against the
*working directory*, so every source path is absolute. They come from ``data/<variant>/sources.json`` (written by
``digiq features materialize``), else from the default layout: ``$DIGIQ_DATA`` or the ``data/`` folder beside this
repository. The variant is ``$DIGIQ_FEATURE_VARIANT`` (default ``finetuned``). So ``feast apply`` run by hand in this
folder registers exactly what the stage registered.

Embeddings are ``Array(Float32)``: the Parquet columns are Arrow ``fixed_size_list<float32>[d]``; Feast reads them as
lists and serves them as lists of floats (bit-exact float32 values).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, Float32, Float64, Int32, String

from digiq import feature_contract as fc

REPO = Path(__file__).resolve().parent
DEFAULT_VARIANT = "finetuned"
FOREVER = timedelta(0)  # Feast: a ttl of 0 means features never expire (one row per key, versioned by timestamp)
ENTITIES = {"state_key": ("state", "a dataset step's screen: f'{traj_id}/{step_id}'"),
            "cand_key": ("candidate", "one of the K candidate actions of a state: f'{traj_id}/{step_id}/{cand_idx}'")}


def source_paths(variant: str, repo: Path = REPO) -> dict[str, str]:
    """Absolute Parquet paths of the sources of ``variant``: as last materialized, else the default layout."""
    manifest = fc.runtime_dir(repo, variant) / "sources.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    data = Path(os.environ.get("DIGIQ_DATA") or repo.parent / "data")
    channels = data / "channels"
    return fc.source_paths(data / "embeddings", data / "features", variant,
                           channels if (channels / fc.STATES_FILE).is_file() else None)


def feast_type(dtype: pa.DataType) -> object:
    """The Feast type serving an Arrow column type of the contract."""
    if pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return Array(feast_type(dtype.value_type))
    scalars = {pa.string(): String, pa.int32(): Int32, pa.float32(): Float32, pa.float64(): Float64, pa.bool_(): Bool}
    return scalars[dtype]


def build(paths: dict[str, str]) -> dict[str, object]:
    """Every Feast object of the repository, reading the given source files."""
    schemas = fc.source_schemas()
    entities = {key: Entity(name=name, join_keys=[key], value_type=ValueType.STRING, description=text)
                for key, (name, text) in ENTITIES.items()}
    views = {
        view.name: FeatureView(
            name=view.name, entities=[entities[view.key]], ttl=FOREVER, online=view.online, description=view.description,
            source=FileSource(name=f"{view.source}_source", path=paths[view.source], timestamp_field="event_timestamp"),
            schema=[Field(name=column, dtype=feast_type(schemas[view.source].field(column).type))
                    for column in (view.key, *view.features)],
        )
        for view in fc.served_views(paths)
    }
    services = {
        "state_features": FeatureService(name="state_features", description="everything keyed by state_key",
                                         features=[views["state_embedding"], views["transition"], views["eps_label"]]),
        "candidate_features": FeatureService(name="candidate_features", description="everything keyed by cand_key (offline)",
                                             features=[views["candidate_embedding"]]),
    }
    channel_views = [views[name] for name in fc.CHANNEL_VIEWS.values() if name in views and views[name].online]
    if channel_views:
        services["channel_features"] = FeatureService(name="channel_features", description="the critic's state channels (online)",
                                                      features=channel_views)
    return {entity.name: entity for entity in entities.values()} | views | services


# Module-level objects are what `feast apply` / `feast plan` discover in this folder.
_objects = build(source_paths(os.environ.get("DIGIQ_FEATURE_VARIANT") or DEFAULT_VARIANT))
state = _objects["state"]
candidate = _objects["candidate"]
state_embedding = _objects["state_embedding"]
candidate_embedding = _objects["candidate_embedding"]
candidate_block = _objects["candidate_block"]
transition = _objects["transition"]
eps_label = _objects["eps_label"]
state_features = _objects["state_features"]
candidate_features = _objects["candidate_features"]
globals().update({name: _objects[name] for name in (*fc.CHANNEL_VIEWS.values(), "channel_features") if name in _objects})
