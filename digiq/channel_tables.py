"""The channel tables of a dataset: the critic's state and candidate channels (:mod:`digiq.channels`), computed once.

    data/raw (screenshots, goals, actions, DOM elements) ─┐
    data/candidates.parquet (K actions per state)      ─┴▶ states.parquet      image, goal, prev_action, fields per step
                                                           candidates.parquet  action per candidate

Per step t of trajectory τ (keys and timestamps: :mod:`digiq.feature_contract`):

    image(t)       = v(s_t) ⊕ v(s_{t−1})                          v(s_{−1}) = 0
    goal(t)        = e(goal)
    prev_action(t) = e(type(a_{t−1})) ⊕ e(text(a_{t−1}))         a_{t−1} the dataset action of step t−1 ("" at t = 0)
    fields(t)      = e(what the text fields of page t hold)        "" on a page without text fields
    action(t, k)   = e(type(a_k)) ⊕ e(text(a_k))                  a_k the k-th candidate of the candidate table

the texts of a tap naming the control under it on the page of the step it was taken in
(:func:`digiq.channels.action_strings`). A screenshot shared by several steps is encoded once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from digiq import feature_contract as fc
from digiq.channels import STATE_CHANNELS, Elements, action_strings, action_vectors, fields_string
from digiq.errors import DigiqError

if TYPE_CHECKING:
    from digiq.channels import VisionTower
    from digiq.store import Dataset
    from digiq.text_encoder import SentenceEncoder

STEP_COLUMNS = ["traj_id", "step_id", "goal", "action", "elements", "screenshot", "screenshot_sha256"]


def read_steps(dataset: Dataset) -> list[dict[str, Any]]:
    """The dataset's steps (the columns the channels need), ordered by trajectory and step."""
    table = dataset.table()
    missing = [c for c in STEP_COLUMNS if c not in table.column_names and c != "elements"]
    if missing:
        raise DigiqError("missing column in the step table", file=dataset.root, field=missing[0])
    rows = table.select([c for c in STEP_COLUMNS if c in table.column_names]).to_pylist()
    return sorted(rows, key=lambda r: (r["traj_id"], r["step_id"]))


def page_of(row: dict[str, Any], file: str | Path) -> Elements:
    """A step's DOM elements (None when the dataset has none), a bad JSON naming the file and step."""
    from digiq.envs.view import parse_elements

    try:
        return parse_elements(row.get("elements")) or None
    except DigiqError as exc:
        raise DigiqError(f"step {fc.state_key(row['traj_id'], row['step_id'])!r}: {exc.message}", file=file,
                         field="elements") from None


def strings_of(action: Any, elements: Elements, where: str, file: str | Path) -> tuple[str, str]:
    """:func:`digiq.channels.action_strings`, an unreadable action naming the file, the row and the column."""
    from digiq.errors import ActionParseError

    try:
        return action_strings(action, elements)
    except ActionParseError as exc:
        raise DigiqError(f"{where}: {exc.message}", file=file, field="action") from None


def image_vectors(dataset: Dataset, steps: list[dict[str, Any]], vision: VisionTower, batch_size: int,
                  bar: Any) -> dict[str, np.ndarray]:
    """v(s) per distinct screenshot (by sha256), in batches."""
    first = {}
    for row in steps:
        first.setdefault(row["screenshot_sha256"], row["screenshot"])
    shas = list(first)
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(shas), batch_size):
        batch = shas[start:start + batch_size]
        images = [dataset.load_image(first[sha], sha) for sha in batch]
        vectors.update(zip(batch, vision(images), strict=True))
        bar.advance(len(batch))
    return vectors


def state_table(steps: list[dict[str, Any]], pages: list[Elements], images: dict[str, np.ndarray],
                encoder: SentenceEncoder, file: str | Path) -> pa.Table:
    """One row per step: its keys, its state channels (image, goal, prev_action, fields) and the strings they encode."""
    position = {(r["traj_id"], r["step_id"]): i for i, r in enumerate(steps)}
    current = np.stack([images[r["screenshot_sha256"]] for r in steps]) if steps else np.zeros((0, 1), np.float32)
    before = np.zeros_like(current)
    previous: list[tuple[str, str]] = []
    for i, row in enumerate(steps):
        j = position.get((row["traj_id"], row["step_id"] - 1))
        if j is None:
            previous.append(("", ""))
            continue
        before[i] = current[j]
        previous.append(strings_of(steps[j]["action"], pages[j], f"step {fc.state_key(row['traj_id'], row['step_id'] - 1)!r}", file))
    goal = encoder([r["goal"] for r in steps])
    prev = action_vectors(encoder, previous)
    fields_text = [fields_string(page) for page in pages]
    fields = encoder(fields_text)
    image = np.concatenate([current, before], axis=1)
    return pa.table({
        "state_key": [fc.state_key(r["traj_id"], r["step_id"]) for r in steps],
        "traj_id": [r["traj_id"] for r in steps], "step_id": pa.array([r["step_id"] for r in steps], pa.int32()),
        "event_timestamp": pa.array([fc.event_timestamp(r["step_id"]) for r in steps], fc.TIMESTAMP),
        "image": vectors(image), "goal": vectors(goal), "prev_action": vectors(prev),
        "prev_type": [p[0] for p in previous], "prev_text": [p[1] for p in previous],
        "fields": vectors(fields), "fields_text": fields_text,
    }, schema=fc.channel_states_schema(image.shape[1], goal.shape[1], prev.shape[1], fields.shape[1]))


def candidate_table(candidates: pa.Table, steps: list[dict[str, Any]], pages: list[Elements],
                    encoder: SentenceEncoder, file: str | Path) -> pa.Table:
    """One row per candidate of the candidate table: its keys and action channel, and the strings it encodes."""
    position = {(r["traj_id"], r["step_id"]): i for i, r in enumerate(steps)}
    traj, step = candidates["traj_id"].to_pylist(), candidates["step_id"].to_pylist()
    idx, actions = candidates["cand_idx"].to_pylist(), candidates["action"].to_pylist()
    strings, keys = [], []
    for t, s, k, action in zip(traj, step, idx, actions, strict=True):
        key = fc.state_key(t, s)
        i = position.get((t, s))
        if i is None:
            raise DigiqError(f"candidate of state {key!r}, which is not in the dataset (re-run `digiq candidates`)",
                             file=file, field="step_id")
        strings.append(strings_of(action, pages[i], f"candidate {fc.cand_key(key, k)!r}", file))
        keys.append(key)
    action = action_vectors(encoder, strings)
    return pa.table({
        "cand_key": [fc.cand_key(key, k) for key, k in zip(keys, idx)], "state_key": keys,
        "cand_idx": pa.array(idx, pa.int32()),
        "event_timestamp": pa.array([fc.event_timestamp(s) for s in step], fc.TIMESTAMP),
        "action": vectors(action), "action_type": [p[0] for p in strings], "action_text": [p[1] for p in strings],
    }, schema=fc.channel_candidates_schema(action.shape[1]))


def taps_named(candidates: pa.Table) -> float | None:
    """Share of the candidate taps whose text names a control (how often the DOM was there to name the target)."""
    types, texts = candidates["action_type"].to_pylist(), candidates["action_text"].to_pylist()
    taps = [text for kind, text in zip(types, texts) if kind == "tap"]
    return round(sum(1 for text in taps if text) / len(taps), 4) if taps else None


def vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def build_tables(dataset: Dataset, candidates_path: str | Path, vision: VisionTower, encoder: SentenceEncoder, *,
                 batch_size: int = 64, progress: bool = False) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """(states, candidates, metrics) of the channels of ``dataset`` and its candidate table (DigiqError naming the
    file and column of a bad input)."""
    from digiq.feature_sources import check_table
    from digiq.parquet import read_table
    from digiq.progress import progress_bar

    started = time.perf_counter()
    check_table(candidates_path, fc.CANDIDATE_TABLE_SCHEMA, rerun="digiq candidates")
    candidates = read_table(candidates_path, ["traj_id", "step_id", "cand_idx", "action"])
    steps = read_steps(dataset)
    if not steps:
        raise DigiqError("the dataset has no steps", file=dataset.root, field="step_id")
    pages = [page_of(r, dataset.root) for r in steps]
    n_images = len({r["screenshot_sha256"] for r in steps})
    with progress_bar("channels", total=n_images, enabled=progress, unit="screenshots") as bar:
        images = image_vectors(dataset, steps, vision, batch_size, bar)
    vision_s = time.perf_counter() - started
    states = state_table(steps, pages, images, encoder, dataset.root)
    cands = candidate_table(candidates, steps, pages, encoder, candidates_path)
    metrics = {
        "states": states.num_rows, "candidates": cands.num_rows, "screenshots": n_images,
        "distinct_strings": len(encoder.cache),
        "candidate_taps_named": taps_named(cands),
        "dims": {name: states.schema.field(name).type.list_size for name in STATE_CHANNELS}
        | {"action": cands.schema.field("action").type.list_size},
        "seconds": {"vision": round(vision_s, 3), "total": round(time.perf_counter() - started, 3)},
    }
    return states, cands, metrics


def write_tables(folder: str | Path, states: pa.Table, candidates: pa.Table) -> None:
    """Both tables as one folder, replaced as a whole (atomically)."""
    import pyarrow.parquet as pq

    from digiq.atomic import atomic_path

    with atomic_path(folder) as tmp:
        tmp.mkdir()
        pq.write_table(states, tmp / fc.CHANNEL_SOURCES["channel_states"])
        pq.write_table(candidates, tmp / fc.CHANNEL_SOURCES["channel_candidates"])

