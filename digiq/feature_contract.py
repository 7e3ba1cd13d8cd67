"""The feature contract: keys, event timestamps, table schemas, feature views and the candidate de-duplication rule.

Written once here and followed by every side: the candidates and embed stages write these tables, the features stage
checks and derives from them, the Feast definitions (``features/digiq_feature_repo.py``) declare their views from
:data:`VIEWS`, and :mod:`digiq.store_client` reads them back. No Feast here: only Arrow types and plain names.

    entity     join key   value
    state      state_key  f"{traj_id}/{step_id}"              one per dataset step
    candidate  cand_key   f"{traj_id}/{step_id}/{cand_idx}"   K per step, cand_idx 0 = the dataset action

Event timestamps never come from the clock: an embedding row of step t is stamped ``EPOCH + t`` seconds, a derived row
``EPOCH``; training sets are read as of :data:`AS_OF`.

Candidates are de-duplicated by what they do (:func:`semantic_key`); a kept candidate carries how many of π_β's draws
it stands for (:func:`draw_counts`; 0 marks a repeat of an earlier candidate of the same state).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from digiq.errors import DigiqError

EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
AS_OF = datetime(2100, 1, 1, tzinfo=timezone.utc)
TIMESTAMP = pa.timestamp("us", tz="UTC")

STATES_FILE = "states.parquet"
CANDIDATES_FILE = "candidates.parquet"
MANIFEST_FILE = "embedding.json"  # the embed run's settings and vector sizes (dim_state, dim_candidate)
DERIVED = ("transitions", "labels", "candidate_blocks")  # written by the features stage, one Parquet file each
CHANNEL_SOURCES = {"channel_states": STATES_FILE, "channel_candidates": CANDIDATES_FILE}  # `digiq channels`' folder
_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- keys and timestamps

def state_key(traj_id: str, step_id: int) -> str:
    return f"{traj_id}/{int(step_id)}"


def cand_key(state_key: str, cand_idx: int) -> str:
    return f"{state_key}/{int(cand_idx)}"


def state_key_sql(traj_id: str = "traj_id", step_id: str = "step_id") -> str:
    """:func:`state_key` as a DuckDB expression over two columns."""
    return f"{traj_id} || '/' || {step_id}"


def cand_key_sql(state_key: str = "state_key", cand_idx: str = "cand_idx") -> str:
    """:func:`cand_key` as a DuckDB expression over a state key and an index column."""
    return state_key_sql(state_key, cand_idx)


def split_state_keys(keys: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """State keys → (traj_id [N] str, step_id [N] int64); a traj_id may itself contain '/'."""
    parts = [str(key).rsplit("/", 1) for key in keys]
    return np.array([p[0] for p in parts], dtype=object), np.array([int(p[1]) for p in parts], dtype=np.int64)


def event_timestamp(step_id: int) -> datetime:
    """The event timestamp of an embedding row of step ``step_id``."""
    return EPOCH + timedelta(seconds=int(step_id))


# ----------------------------------------------------------------------------- table schemas

def states_schema(d: int) -> pa.Schema:
    """data/embeddings/<variant>/states.parquet: f(s) per dataset step."""
    return pa.schema([("state_key", pa.string()), ("traj_id", pa.string()), ("step_id", pa.int32()),
                      ("event_timestamp", TIMESTAMP), ("embedding", pa.list_(pa.float32(), d)),
                      ("model_hash", pa.string()), ("layer", pa.int32())])


def candidates_schema(d: int) -> pa.Schema:
    """data/embeddings/<variant>/candidates.parquet: f(s, a_k) per candidate."""
    return pa.schema([("cand_key", pa.string()), ("state_key", pa.string()), ("traj_id", pa.string()),
                      ("step_id", pa.int32()), ("cand_idx", pa.int32()), ("action", pa.string()),
                      ("event_timestamp", TIMESTAMP), ("embedding", pa.list_(pa.float32(), d)),
                      ("model_hash", pa.string()), ("layer", pa.int32())])


CANDIDATE_TABLE_SCHEMA = pa.schema([  # data/candidates.parquet, written by the candidates stage
    ("traj_id", pa.string()), ("step_id", pa.int32()), ("cand_idx", pa.int32()), ("action", pa.string()),
    ("semantic_key", pa.string()), ("draws", pa.int32()),
])
LABELS_READ = pa.schema([  # the columns of data/labels.parquet the feature store serves
    ("traj_id", pa.string()), ("step_id", pa.int32()), ("action_kind", pa.string()), ("mse", pa.float64()),
    ("label", pa.string()), ("epsilon", pa.float64()),
])
TRANSITIONS_SCHEMA = pa.schema([
    ("state_key", pa.string()), ("next_state_key", pa.string()), ("reward", pa.float64()), ("done", pa.bool_()),
    ("mc_return", pa.float64()), ("action", pa.string()), ("n_candidates", pa.int32()), ("event_timestamp", TIMESTAMP),
])
CANDIDATE_BLOCKS_SCHEMA = pa.schema([
    ("state_key", pa.string()), ("event_timestamp", TIMESTAMP), ("embeddings", pa.list_(pa.float32())),
    ("actions", pa.list_(pa.string())), ("semantic_keys", pa.list_(pa.string())), ("draws", pa.list_(pa.int32())),
    ("n_candidates", pa.int32()),
])
LABELS_SCHEMA = pa.schema([
    ("state_key", pa.string()), ("label", pa.string()), ("mse", pa.float64()), ("epsilon", pa.float64()),
    ("action_kind", pa.string()), ("event_timestamp", TIMESTAMP),
])


def channel_states_schema(d_image: int = 1, d_goal: int = 1, d_prev: int = 1, d_fields: int = 1) -> pa.Schema:
    """data/channels/states.parquet: the critic's state channels per dataset step (:mod:`digiq.channels`), with the
    strings they encode (the previous action's type and text, the text fields' contents)."""
    return pa.schema([("state_key", pa.string()), ("traj_id", pa.string()), ("step_id", pa.int32()),
                      ("event_timestamp", TIMESTAMP), ("image", pa.list_(pa.float32(), d_image)),
                      ("goal", pa.list_(pa.float32(), d_goal)), ("prev_action", pa.list_(pa.float32(), d_prev)),
                      ("prev_type", pa.string()), ("prev_text", pa.string()),
                      ("fields", pa.list_(pa.float32(), d_fields)), ("fields_text", pa.string())])


def channel_candidates_schema(d_action: int = 1) -> pa.Schema:
    """data/channels/candidates.parquet: the action channel e(type) ⊕ e(text) per candidate, with its strings."""
    return pa.schema([("cand_key", pa.string()), ("state_key", pa.string()), ("cand_idx", pa.int32()),
                      ("event_timestamp", TIMESTAMP), ("action", pa.list_(pa.float32(), d_action)),
                      ("action_type", pa.string()), ("action_text", pa.string())])


def source_schemas(dim_state: int = 1, dim_candidate: int = 1) -> dict[str, pa.Schema]:
    """The schema of each Feast source, by the name :func:`source_paths` gives its file (the vector sizes matter only
    to writers: readers check the column types)."""
    return {"states": states_schema(dim_state), "candidates": candidates_schema(dim_candidate),
            "transitions": TRANSITIONS_SCHEMA, "labels": LABELS_SCHEMA, "candidate_blocks": CANDIDATE_BLOCKS_SCHEMA,
            "channel_states": channel_states_schema(), "channel_candidates": channel_candidates_schema()}


# ----------------------------------------------------------------------------- feature views

@dataclass(frozen=True)
class View:
    """One Feast feature view: its entity's join key, its source and the source columns it serves."""

    name: str
    key: str
    source: str
    features: tuple[str, ...]
    online: bool
    description: str


VIEWS = (
    View("state_embedding", "state_key", "states", ("embedding", "model_hash", "layer"), True,
         "f(s): the frozen VLM's hidden state for the screen (and goal) of a step"),
    View("candidate_embedding", "cand_key", "candidates",
         ("embedding", "state_key", "cand_idx", "action", "model_hash", "layer"), False,
         "f(s, a) for each candidate action (AutoUI string); cand_idx 0 is the dataset action"),
    View("candidate_block", "state_key", "candidate_blocks", ("embeddings", "actions", "semantic_keys", "draws"), True,
         "a state's K candidates in cand_idx order: vectors f(s, a_k) concatenated ([K·d]), actions, semantic keys and "
         "π_β draws (0: a repeat of an earlier candidate)"),
    View("transition", "state_key", "transitions", ("next_state_key", "reward", "done", "mc_return", "action", "n_candidates"),
         True, "(r, done, s') of the dataset step; next_state_key is null when no next step is stored"),
    View("eps_label", "state_key", "labels", ("label", "mse", "epsilon", "action_kind"), True,
         "ε-label of the dataset action: Yes when the downscaled pixel MSE exceeds ε (terminal steps have none)"),
    # the critic's extra input channels (digiq/channels.py), served when `digiq channels` wrote its folder
    View("image_channel", "state_key", "channel_states", ("image",), True,
         "v(s) ⊕ v(s_prev): the frozen vision tower's pooled feature of the screenshot and of the previous one (zeros at step 0)"),
    View("goal_channel", "state_key", "channel_states", ("goal",), True,
         "e(goal): the frozen sentence encoder's (all-MiniLM-L6-v2) embedding of the instruction"),
    View("prev_action_channel", "state_key", "channel_states", ("prev_action", "prev_type", "prev_text"), True,
         "e(type) ⊕ e(text) of the previous step's action (empty strings at step 0), and those strings"),
    View("fields_channel", "state_key", "channel_states", ("fields", "fields_text"), True,
         "e(fields): the sentence embedding of what the page's text fields hold (\"\" without text fields), and that text"),
    View("action_channel", "cand_key", "channel_candidates", ("action", "action_type", "action_text"), False,
         "e(type) ⊕ e(text) of each candidate action: its kind in words, and its typed text or the tapped control's name"),
)
VIEW = {view.name: view for view in VIEWS}
CHANNEL_VIEWS = {"image": "image_channel", "goal": "goal_channel", "prev_action": "prev_action_channel",
                 "fields": "fields_channel", "action": "action_channel"}  # channel name → the view serving it (the feature has the channel's name)


def refs(*views: str) -> list[str]:
    """Feast feature references ``view:feature`` of every feature of ``views``."""
    return [f"{name}:{feature}" for name in views for feature in VIEW[name].features]


# ----------------------------------------------------------------------------- where the store lives

def check_variant(variant: str) -> str:
    if not _VARIANT.fullmatch(variant):
        raise DigiqError(f"{variant!r} is not a variant name (letters, digits, _ . -)", field="features.variant")
    return variant


def runtime_dir(repo: str | Path, variant: str) -> Path:
    """The Feast run-time state of one variant (registry, online store, rendered config; git-ignored)."""
    return Path(repo) / "data" / check_variant(variant)


def source_paths(embeddings: str | Path, derived: str | Path, variant: str,
                 channels: str | Path | None = None) -> dict[str, str]:
    """Absolute Parquet paths of the sources of ``variant`` (DuckDB resolves relative paths against the working
    directory, so Feast only ever sees absolute ones): the embed stage's two tables, the features stage's three, and
    with ``channels`` (the channels stage's folder, shared by every variant) its two."""
    tables = Path(embeddings).resolve() / check_variant(variant)
    folder = Path(derived).resolve() / variant
    paths = {"states": str(tables / STATES_FILE), "candidates": str(tables / CANDIDATES_FILE),
             **{name: str(folder / f"{name}.parquet") for name in DERIVED}}
    if channels is not None:
        paths.update({name: str(Path(channels).resolve() / file) for name, file in CHANNEL_SOURCES.items()})
    return paths


def served_views(paths: dict[str, str]) -> tuple[View, ...]:
    """The views whose source is among ``paths`` (the channel views only when the channel sources are given)."""
    return tuple(view for view in VIEWS if view.source in paths)


# ----------------------------------------------------------------------------- candidate de-duplication

def semantic_key(action: Any, elements: list[dict[str, Any]] | None) -> str:
    """What an action *does*: a tap is the innermost tappable DOM element under its point (``tap@<ref>``, ``tap@none``
    off every control); any other action is its canonical string. Without elements (imported data) it is the
    canonical string.

    π_β jitters every tap inside its element, so as strings no two taps are ever equal, while a TYPE or PRESS_ENTER
    drawn 20 times collapses to one candidate. De-duplicating by string would hand each discrete action the whole
    mass of its copies and split a tap's mass over its jittered copies."""
    from digiq.actions import format_action, parse_action
    from digiq.envs.behavior import tapped_element

    a = parse_action(action) if isinstance(action, str) else action
    if a.kind != "tap" or not elements:
        return format_action(a)
    hit = tapped_element(a.touch_point, elements)
    return f"tap@{hit['ref'] if hit is not None else 'none'}"


def key_classes(keys: Iterable[Hashable]) -> dict[Hashable, tuple[int, int]]:
    """Group a sequence by key, in first-occurrence order: key → (position of its first item, items sharing it).
    The first draw of a class stands for all its draws (training and live evaluation alike)."""
    classes: dict[Hashable, tuple[int, int]] = {}
    for position, key in enumerate(keys):
        first, count = classes.get(key, (position, 0))
        classes[key] = (first, count + 1)
    return classes


def draw_counts(keys: Iterable[Hashable]) -> list[int]:
    """Per item of one state's candidates: the draws its class stands for at the class's first item, 0 at repeats."""
    keys = list(keys)
    counts = [0] * len(keys)
    for first, count in key_classes(keys).values():
        counts[first] = count
    return counts
