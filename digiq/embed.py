"""The embed job: frozen features f(s) and f(s, a) (:mod:`digiq.extractor`) of every state and candidate action of a
dataset, written as the two embedding tables.

    run = embed_dataset(Dataset("data/raw"), candidates_table, extractor, out="data/embeddings/finetuned",
                        parts="data/embeddings/.parts/finetuned", model_hash=model_hash("models/finetuned"))

Work is done once per input: each screenshot is encoded once per chunk (by content hash), states with the
same (screenshot, goal, observation) share one f(s), and duplicate candidates (the same canonical action
string in a state) share one f(s, a). Output is written per chunk of states (``parts/``, each file atomic);
a rerun with the same fingerprint skips finished chunks, then the parts are merged into
``states.parquet`` + ``candidates.parquet`` (the contract read by the Feast repository). Under ``accelerate
launch`` the processes share the chunks and the main one merges them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digiq.actions import parse_action
from digiq.errors import DigiqError
from digiq.extractor import Elements, Extractor
from digiq.feature_contract import (CANDIDATES_FILE, MANIFEST_FILE, STATES_FILE, cand_key, candidates_schema,
                                    event_timestamp, state_key, states_schema)
from digiq.progress import progress_bar

if TYPE_CHECKING:
    from digiq.parallel import Ranks
    from digiq.schema import Action
    from digiq.store import Dataset

PARTS_MANIFEST = "fingerprint.json"
DEGENERATE_TOL = 1e-6  # relative: f(s, ·) within this of one row for all distinct actions = degenerate


# ----------------------------------------------------------------------------- one chunk

@dataclass
class ChunkResult:
    states: pa.Table
    candidates: pa.Table
    computed: int  # distinct forward samples actually computed (states + distinct state-action pairs)
    images: int  # screenshots encoded


def embed_chunk(dataset: Dataset, steps: list[dict[str, Any]], cands: dict[tuple[str, int], list[tuple[int, str]]],
                extractor: Extractor, model_hash: str, layer: int) -> ChunkResult:
    """f(s) and f(s, a) for the ``steps`` rows (traj_id, step_id, goal, observation, screenshot, sha, elements) and their
    candidates ``cands[(traj_id, step_id)] = [(cand_idx, action string), ...]``."""
    shas = list(dict.fromkeys(r["screenshot_sha256"] for r in steps))
    first = {r["screenshot_sha256"]: r for r in reversed(steps)}
    images = {sha: dataset.load_image(first[sha]["screenshot"], sha) for sha in shas}
    tokens = extractor.encode([images[sha] for sha in shas])
    image_row = {sha: i for i, sha in enumerate(shas)}

    # f(s): once per distinct (screenshot, goal, observation)
    state_of = {(r["traj_id"], r["step_id"]): (r["screenshot_sha256"], r["goal"], r["observation"]) for r in steps}
    unique_states = list(dict.fromkeys(state_of.values()))
    elements_of = _elements_of(steps, state_of) if extractor.reads_elements else {}
    index = [image_row[sha] for sha, _, _ in unique_states]
    f_s = extractor.states(tokens[index], [g for _, g, _ in unique_states], [o for _, _, o in unique_states],
                           [elements_of.get(key) for key in unique_states])
    f_s_of = dict(zip(unique_states, f_s, strict=True))

    # f(s, a): once per distinct (state, canonical action)
    wanted_of: dict[Any, dict[str, Action]] = {key: {} for key in unique_states}
    for step_key, key in state_of.items():
        for _, text in cands.get(step_key, []):
            action = parse_action(text)
            wanted_of[key].setdefault(_canonical(action), action)
    f_sa: dict[tuple[Any, str], np.ndarray] = {}
    for key, wanted in wanted_of.items():
        sha, goal, obs = key
        if not wanted:
            continue
        row = image_row[sha]
        feats = extractor.candidates(tokens[row:row + 1], images[sha].size, goal, obs, list(wanted.values()),
                                     elements_of.get(key))
        f_sa.update({(key, c): v for c, v in zip(wanted, feats, strict=True)})

    states = _states_table(steps, state_of, f_s_of, extractor.dim_state, model_hash, layer)
    candidates = _candidates_table(steps, cands, state_of, f_sa, extractor.dim_candidate, model_hash, layer)
    return ChunkResult(states, candidates, computed=len(unique_states) + len(f_sa), images=len(shas))


def _elements_of(steps: list[dict[str, Any]], state_of: dict[tuple[str, int], Any]) -> dict[Any, Elements]:
    """The DOM elements of each distinct state (its first step's)."""
    from digiq.envs.view import parse_elements

    return {state_of[(r["traj_id"], r["step_id"])]: parse_elements(r.get("elements")) for r in reversed(steps)}


def _canonical(action: Action) -> str:
    from digiq.actions import format_action

    return format_action(action)


def _states_table(steps: list[dict[str, Any]], state_of: dict, f_s_of: dict, d: int, model_hash: str,
                  layer: int) -> pa.Table:
    keys = [(r["traj_id"], int(r["step_id"])) for r in steps]
    emb = np.stack([f_s_of[state_of[k]] for k in keys]).astype(np.float32) if keys else np.zeros((0, d), np.float32)
    return pa.table({
        "state_key": [state_key(t, s) for t, s in keys], "traj_id": [t for t, _ in keys], "step_id": [s for _, s in keys],
        "event_timestamp": [event_timestamp(s) for _, s in keys], "embedding": _vectors(emb, d),
        "model_hash": [model_hash] * len(keys), "layer": [layer] * len(keys),
    }, schema=states_schema(d))


def _candidates_table(steps: list[dict[str, Any]], cands: dict, state_of: dict, f_sa: dict, d: int, model_hash: str,
                      layer: int) -> pa.Table:
    cols: dict[str, list[Any]] = {k: [] for k in ("cand_key", "state_key", "traj_id", "step_id", "cand_idx", "action",
                                                  "event_timestamp")}
    vectors = []
    for r in steps:
        traj, step = r["traj_id"], int(r["step_id"])
        skey = state_of[(traj, step)]
        for idx, text in cands.get((traj, step), []):
            cols["cand_key"].append(cand_key(state_key(traj, step), idx))
            cols["state_key"].append(state_key(traj, step))
            cols["traj_id"].append(traj)
            cols["step_id"].append(step)
            cols["cand_idx"].append(int(idx))
            cols["action"].append(text)
            cols["event_timestamp"].append(event_timestamp(step))
            vectors.append(f_sa[(skey, _canonical(parse_action(text)))])
    emb = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, d), np.float32)
    n = len(vectors)
    return pa.table({**cols, "embedding": _vectors(emb, d), "model_hash": [model_hash] * n, "layer": [layer] * n},
                    schema=candidates_schema(d))


def _vectors(emb: np.ndarray, d: int) -> pa.FixedSizeListArray:
    if emb.ndim != 2 or emb.shape[1] != d:
        raise DigiqError(f"expected [rows, {d}] embeddings, got {list(emb.shape)}", field="embedding")
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), d)


# ----------------------------------------------------------------------------- checks

def check_embeddings(states: pa.Table, candidates: pa.Table, dim_state: int, dim_candidate: int,
                     file: str | Path) -> None:
    """Finite values, the right dimension, and f(s, ·) not constant across the distinct actions of a state."""
    for name, table, d in (("states", states, dim_state), ("candidates", candidates, dim_candidate)):
        width = table.schema.field("embedding").type.list_size
        if width != d:
            raise DigiqError(f"{name} embeddings have dimension {width}, expected {d}", file=file, field="embedding")
        emb = embedding_matrix(table)
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():
            key = table.column("state_key")[int(np.argmax(bad))].as_py()
            raise DigiqError(f"{int(bad.sum())} {name} embedding(s) are not finite (first: state {key})",
                             file=file, field="embedding")
    degenerate = degenerate_states(candidates)
    if degenerate:
        raise DigiqError(f"f(s, a) is identical for all distinct actions of {len(degenerate)} state(s) "
                         f"(first: {degenerate[0]}): the action does not reach the features", file=file,
                         field="embedding")


def embedding_matrix(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    d = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def degenerate_states(candidates: pa.Table) -> list[str]:
    """States with ≥ 2 distinct actions whose f(s, a) rows are all equal (within DEGENERATE_TOL, relative)."""
    emb = embedding_matrix(candidates)
    keys = candidates.column("state_key").to_pylist()
    actions = candidates.column("action").to_pylist()
    rows: dict[str, dict[str, int]] = {}
    for i, (key, action) in enumerate(zip(keys, actions, strict=True)):
        rows.setdefault(key, {}).setdefault(_canonical(parse_action(action)), i)
    out = []
    for key, distinct in rows.items():
        if len(distinct) < 2:
            continue
        block = emb[list(distinct.values())]
        spread = float(np.abs(block - block[0]).max())
        if spread <= DEGENERATE_TOL * (1.0 + float(np.abs(block).max())):
            out.append(key)
    return out


# ----------------------------------------------------------------------------- the whole dataset, resumable

@dataclass
class EmbedRun:
    states: int
    candidates: int
    computed: int  # forward samples computed in this run (resumed chunks excluded)
    images: int
    seconds: float
    chunks: int
    resumed_chunks: int
    dim_state: int
    dim_candidate: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def candidate_lists(candidates: pa.Table) -> dict[tuple[str, int], list[tuple[int, str]]]:
    """``{(traj_id, step_id): [(cand_idx, action), …]}`` in cand_idx order."""
    table = candidates.select(["traj_id", "step_id", "cand_idx", "action"]).sort_by(
        [("traj_id", "ascending"), ("step_id", "ascending"), ("cand_idx", "ascending")])
    out: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for t, s, i, a in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
        out.setdefault((t, int(s)), []).append((int(i), a))
    return out


def check_candidate_coverage(steps: list[dict[str, Any]], cands: dict, file: str | Path) -> None:
    """Every step has candidates numbered 0..K−1 and candidate 0 is its dataset action."""
    for r in steps:
        key = (r["traj_id"], int(r["step_id"]))
        found = cands.get(key)
        if not found:
            raise DigiqError(f"state {key[0]}/{key[1]} has no candidates (run `digiq candidates` on this dataset)",
                             file=file, field="traj_id")
        if [i for i, _ in found] != list(range(len(found))):
            raise DigiqError(f"candidates of state {key[0]}/{key[1]} are not numbered 0..K-1", file=file,
                             field="cand_idx")
        if _canonical(parse_action(found[0][1])) != _canonical(parse_action(r["action"])):
            raise DigiqError(f"candidate 0 of state {key[0]}/{key[1]} is not the dataset action", file=file,
                             field="action")


def fingerprint(steps: list[dict[str, Any]], cands: dict, settings: dict[str, Any]) -> str:
    """What the parts depend on: the inputs (states, candidates) and the settings (model hash, layer, …)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in steps:
        key = (r["traj_id"], int(r["step_id"]))
        h.update(json.dumps([*key, r["screenshot_sha256"], r["goal"], r["observation"], cands.get(key, [])]).encode())
    return h.hexdigest()


def read_candidate_table(path: str | Path) -> pa.Table:
    """The candidate table (``traj_id, step_id, cand_idx, action``…), or one DigiqError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DigiqError("missing candidate table (run `digiq candidates` first)", file=path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DigiqError(f"unreadable Parquet file ({exc})", file=path) from None
    missing = [c for c in ("traj_id", "step_id", "cand_idx", "action") if c not in table.column_names]
    if missing:
        raise DigiqError("missing column", file=path, field=missing[0])
    return table


def embed_dataset(dataset: Dataset, candidates: pa.Table, extractor: Extractor, out: str | Path, parts: str | Path,
                  *, model_hash: str, layer: int, chunk_states: int = 64, settings: dict[str, Any] | None = None,
                  candidates_file: str | Path = "candidates", progress: bool = False,
                  on_chunk: Callable[[int], None] | None = None, ranks: Ranks | None = None) -> EmbedRun:
    """Embed every step of ``dataset`` and every candidate; write ``out``/states.parquet + candidates.parquet.

    Chunks of ``chunk_states`` states go to ``parts`` first (resumed when the fingerprint matches); the merged
    tables are checked (:func:`check_embeddings`) and written atomically (the ``out`` folder as a whole),
    then ``parts`` is removed. ``on_chunk(i)`` is called after chunk i is written (tests interrupt with it).

    Under ``accelerate launch`` (``ranks`` of several processes) each process embeds a contiguous share of the
    chunks into the shared ``parts`` folder; after a barrier the main process merges all chunks by index — the
    same files as a one-process run — and the other processes return (with the summed counts).
    """
    from digiq.parallel import Ranks

    ranks = ranks or Ranks()
    if chunk_states < 1:
        raise DigiqError(f"must be ≥ 1, got {chunk_states}", field="chunk_states")
    columns = ["traj_id", "step_id", "goal", "observation", "screenshot", "screenshot_sha256", "action", "elements"]
    steps = dataset.table().select(columns).to_pylist()
    cands = candidate_lists(candidates)
    check_candidate_coverage(steps, cands, candidates_file)
    parts = Path(parts)
    settings = {**(settings or {}), "model_hash": model_hash, "layer": layer}
    stamp = fingerprint(steps, cands, {**settings, "chunk_states": chunk_states,
                                       "dims": [extractor.dim_state, extractor.dim_candidate]})
    if ranks.is_main:
        _prepare_parts(parts, stamp)
    ranks.barrier()
    chunks = [steps[i:i + chunk_states] for i in range(0, len(steps), chunk_states)]
    started = time.perf_counter()
    computed, images, resumed = _embed_chunks(dataset, chunks, range(*ranks.span(len(chunks))), cands, extractor,
                                              parts, settings, progress=progress and ranks.is_main, on_chunk=on_chunk)
    ranks.barrier()
    seconds = time.perf_counter() - started
    computed, images, resumed = (sum(n) for n in zip(*ranks.gather((computed, images, resumed)), strict=True))
    run = EmbedRun(states=len(steps), candidates=sum(len(cands[(r["traj_id"], int(r["step_id"]))]) for r in steps),
                   computed=computed, images=images, seconds=seconds, chunks=len(chunks), resumed_chunks=resumed,
                   dim_state=extractor.dim_state, dim_candidate=extractor.dim_candidate,
                   extra={"processes": ranks.num} if ranks.num > 1 else {})
    if ranks.is_main:  # the other processes leave merging and writing to it
        _merge_parts(parts, run, Path(out), {**settings, "dim_state": run.dim_state, "dim_candidate": run.dim_candidate})
    return run


def _chunk_files(parts: Path, c: int) -> tuple[Path, Path]:
    return parts / f"states-{c:06d}.parquet", parts / f"candidates-{c:06d}.parquet"


def _embed_chunks(dataset: Dataset, chunks: list[list[dict[str, Any]]], mine: range, cands: dict,
                  extractor: Extractor, parts: Path, settings: dict[str, Any], *, progress: bool,
                  on_chunk: Callable[[int], None] | None) -> tuple[int, int, int]:
    """Embed this process's chunks ``mine`` into ``parts``, skipping finished ones: (computed, images, resumed)."""
    from digiq.atomic import atomic_path

    computed = images = resumed = 0
    started = time.perf_counter()
    with progress_bar("embed", total=sum(len(chunks[c]) for c in mine), enabled=progress, unit="states",
                      status="{rate}", rate="") as bar:
        for c in mine:
            s_path, c_path = _chunk_files(parts, c)
            if s_path.is_file() and c_path.is_file():
                resumed += 1
                bar.advance(len(chunks[c]))
                continue
            result = embed_chunk(dataset, chunks[c], cands, extractor, settings["model_hash"], settings["layer"])
            check_embeddings(result.states, result.candidates, extractor.dim_state, extractor.dim_candidate,
                             file=dataset.root)
            for path, table in ((c_path, result.candidates), (s_path, result.states)):
                with atomic_path(path) as tmp:
                    pq.write_table(table, tmp)
            computed += result.computed
            images += result.images
            bar.advance(len(chunks[c]), rate=f"{computed / max(time.perf_counter() - started, 1e-9):.0f} samples/s")
            if on_chunk is not None:
                on_chunk(c)
    return computed, images, resumed


def _merge_parts(parts: Path, run: EmbedRun, out: Path, manifest: dict[str, Any]) -> None:
    """Concatenate every chunk by index, check the whole, write ``out`` atomically and remove ``parts``."""
    from digiq.atomic import atomic_path, write_json

    files = [_chunk_files(parts, c) for c in range(run.chunks)]
    states_t = pa.concat_tables([pq.read_table(s) for s, _ in files])
    cands_t = pa.concat_tables([pq.read_table(c) for _, c in files])
    if states_t.num_rows != run.states or cands_t.num_rows != run.candidates:
        raise DigiqError(f"merged parts have {states_t.num_rows} states / {cands_t.num_rows} candidates, expected "
                         f"{run.states} (delete {parts} and rerun)", file=parts)
    check_embeddings(states_t, cands_t, run.dim_state, run.dim_candidate, file=parts)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        pq.write_table(states_t, tmp / STATES_FILE)
        pq.write_table(cands_t, tmp / CANDIDATES_FILE)
        write_json(tmp / MANIFEST_FILE, manifest)
    shutil.rmtree(parts, ignore_errors=True)


def _prepare_parts(parts: Path, stamp: str) -> None:
    """Keep finished chunks only when they were made from the same inputs and settings."""
    from digiq.atomic import write_json

    manifest = parts / PARTS_MANIFEST
    if parts.is_dir():
        try:
            same = json.loads(manifest.read_text()).get("fingerprint") == stamp
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        write_json(manifest, {"fingerprint": stamp})
