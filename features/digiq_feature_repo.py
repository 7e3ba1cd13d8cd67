"""digiq's Feast definitions: two entities, five feature views, two feature services.

    entity     join key   keyed rows
    state      state_key  f"{traj_id}/{step_id}"             one per dataset step
    candidate  cand_key   f"{traj_id}/{step_id}/{cand_idx}"  K per step, cand_idx 0 = the dataset action

    view                 entity     source (Parquet)                                  features
    state_embedding      state      data/embeddings/<variant>/states.parquet        embedding f(s), model_hash, layer
    candidate_embedding  candidate  data/embeddings/<variant>/candidates.parquet    embedding f(s, a), action, cand_idx, ... (offline only)
    candidate_block      state      features/data/<variant>/sources/candidate_blocks  embeddings [K·d], actions [K]
    transition           state      features/data/<variant>/sources/transitions     next_state_key, reward, done, mc_return, action, n_candidates
    eps_label            state      features/data/<variant>/sources/labels          label (Yes/No), mse, epsilon, action_kind

``candidate_block`` holds the same vectors as ``candidate_embedding``, one row per state: the K
candidate vectors concatenated in cand_idx order (reshape to [K, d]). Online reads of a state's
candidates are then one entity lookup instead of K, so only it goes to the online store;
``candidate_embedding`` serves point-in-time training sets (``get_historical_features``).

Paths are resolved when this module is imported, never committed: DuckDB reads a FileSource path
against the *working directory*, so every source path is made absolute here. The paths come from
``data/<variant>/sources.json`` (written by ``digiq features materialize`` from params.yaml), else
from the default layout: ``$DIGIQ_DATA`` or the ``data/`` folder beside this repository. The
variant is ``$DIGIQ_FEATURE_VARIANT`` (default ``finetuned``). So ``feast apply`` run by hand in
this folder registers exactly what the stage registered.

Embeddings are ``Array(Float32)``: the Parquet columns are Arrow ``fixed_size_list<float32>[d]``;
Feast reads them as lists and serves them as lists of floats (bit-exact float32 values).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, Float32, Float64, Int32, String

REPO = Path(__file__).resolve().parent
DEFAULT_VARIANT = "finetuned"
FOREVER = timedelta(0)  # Feast: a ttl of 0 means features never expire (one row per key, versioned by timestamp)


def runtime_dir(variant: str, repo: Path = REPO) -> Path:
    """Run-time state of one variant: registry, online store, derived sources (git-ignored)."""
    return repo / "data" / variant


def source_paths(variant: str, repo: Path = REPO) -> dict[str, str]:
    """Absolute Parquet paths of the four sources of ``variant``."""
    manifest = runtime_dir(variant, repo) / "sources.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    data = Path(os.environ.get("DIGIQ_DATA") or repo.parent / "data").resolve()
    derived = runtime_dir(variant, repo).resolve() / "sources"
    return {
        "states": str(data / "embeddings" / variant / "states.parquet"),
        "candidates": str(data / "embeddings" / variant / "candidates.parquet"),
        "transitions": str(derived / "transitions.parquet"),
        "labels": str(derived / "labels.parquet"),
        "candidate_blocks": str(derived / "candidate_blocks.parquet"),
    }


def _source(name: str, path: str) -> FileSource:
    return FileSource(name=f"{name}_source", path=path, timestamp_field="event_timestamp")


def build(paths: dict[str, str]) -> dict[str, object]:
    """Every Feast object of the repository, reading the given source files."""
    state = Entity(name="state", join_keys=["state_key"], value_type=ValueType.STRING,
                   description="a dataset step's screen: f'{traj_id}/{step_id}'")
    candidate = Entity(name="candidate", join_keys=["cand_key"], value_type=ValueType.STRING,
                       description="one of the K candidate actions of a state: f'{traj_id}/{step_id}/{cand_idx}'")
    state_embedding = FeatureView(
        name="state_embedding", entities=[state], ttl=FOREVER, source=_source("states", paths["states"]),
        schema=[Field(name="state_key", dtype=String), Field(name="embedding", dtype=Array(Float32)),
                Field(name="model_hash", dtype=String), Field(name="layer", dtype=Int32)],
        description="f(s): the frozen VLM's hidden state for the screen (and goal) of a step",
    )
    candidate_embedding = FeatureView(
        name="candidate_embedding", entities=[candidate], ttl=FOREVER, source=_source("candidates", paths["candidates"]), online=False,
        schema=[Field(name="cand_key", dtype=String), Field(name="embedding", dtype=Array(Float32)),
                Field(name="state_key", dtype=String), Field(name="cand_idx", dtype=Int32),
                Field(name="action", dtype=String), Field(name="model_hash", dtype=String), Field(name="layer", dtype=Int32)],
        description="f(s, a) for each candidate action (AutoUI string); cand_idx 0 is the dataset action",
    )
    candidate_block = FeatureView(
        name="candidate_block", entities=[state], ttl=FOREVER, source=_source("candidate_blocks", paths["candidate_blocks"]),
        schema=[Field(name="state_key", dtype=String), Field(name="embeddings", dtype=Array(Float32)),
                Field(name="actions", dtype=Array(String))],
        description="the K candidate vectors f(s, a_k) of a state, concatenated in cand_idx order ([K·d]), and their actions",
    )
    transition = FeatureView(
        name="transition", entities=[state], ttl=FOREVER, source=_source("transitions", paths["transitions"]),
        schema=[Field(name="state_key", dtype=String), Field(name="next_state_key", dtype=String),
                Field(name="reward", dtype=Float64), Field(name="done", dtype=Bool), Field(name="mc_return", dtype=Float64),
                Field(name="action", dtype=String), Field(name="n_candidates", dtype=Int32)],
        description="(r, done, s') of the dataset step; next_state_key is null when no next step is stored",
    )
    eps_label = FeatureView(
        name="eps_label", entities=[state], ttl=FOREVER, source=_source("labels", paths["labels"]),
        schema=[Field(name="state_key", dtype=String), Field(name="label", dtype=String), Field(name="mse", dtype=Float64),
                Field(name="epsilon", dtype=Float64), Field(name="action_kind", dtype=String)],
        description="ε-label of the dataset action: Yes when the downscaled pixel MSE exceeds ε (terminal steps have none)",
    )
    state_features = FeatureService(name="state_features", features=[state_embedding, transition, eps_label],
                                     description="everything keyed by state_key")
    candidate_features = FeatureService(name="candidate_features", features=[candidate_embedding],
                                        description="everything keyed by cand_key (offline)")
    return {"state": state, "candidate": candidate, "state_embedding": state_embedding,
            "candidate_embedding": candidate_embedding, "candidate_block": candidate_block, "transition": transition, "eps_label": eps_label,
            "state_features": state_features, "candidate_features": candidate_features}


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
