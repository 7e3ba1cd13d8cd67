"""Frozen features: f(s) for every state and f(s, a) for every candidate action, from a frozen VLM.

    extractor = VLMExtractor(load_vlm("models/finetuned"), layer=2, pooling="last")
    run = embed_dataset(Dataset("data/raw"), candidates_table, extractor, out="data/embeddings/finetuned",
                        parts="data/embeddings/.parts/finetuned", model_hash=model_hash("models/finetuned"))

What is computed (Digi-Q §4.2, DESIGN §1.3):

- f(s)    = pool_ℓ( LM( [image tokens(s)] + state_prompt(goal, observation) ) )
- f(s, a) = pool_ℓ( LM( [image tokens(s)] + prompt(goal, observation, a) ) ),  the action's tap point entering as
  the image token of the patch under it (``marker="patch"``: the screenshot is encoded once per state);
  ``pool_ℓ`` = the last token (``pooling="last"``) or the mean over tokens (``"mean"``) of hidden layer ℓ.
- ``no_vlm`` (ablation, :class:`VisionOnlyExtractor`): the raw vision-tower features, no language model:
  f(s) = mean over patches of v(s);  f(s, a) = mean(v(s)) ⊕ v(s)[patch under a's first point] (zeros when the
  action has no point) ⊕ enc(a), enc(a) = one-hot(kind, 7) ⊕ (touch y, x, lift y, x) ⊕ a 16-bucket hashed
  character-trigram bag of the typed text (L2-normalised).

Work is done once per input: each screenshot is encoded once per chunk (by content hash), states with the
same (screenshot, goal, observation) share one f(s), and duplicate candidates (the same canonical action
string in a state) share one f(s, a). Output is written per chunk of states (``parts/``, each file atomic);
a rerun with the same fingerprint skips finished chunks, then the parts are merged into
``states.parquet`` + ``candidates.parquet`` (the contract read by the Feast repository).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digiq.actions import parse_action
from digiq.errors import DigiqError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from digiq.parallel import Ranks
    from digiq.schema import Action
    from digiq.store import Dataset
    from digiq.vlm.model import VLM

Elements = list[dict[str, Any]] | None  # the DOM elements of a state (what a tap lands on), when known

# Deterministic event timestamps: EMBED_EPOCH + step_id seconds (EMBED_EPOCH = pipelines.features.FEATURE_EPOCH).
EMBED_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
STATES_FILE = "states.parquet"
CANDIDATES_FILE = "candidates.parquet"
MANIFEST_FILE = "embedding.json"  # the run's settings and vector sizes (dim_state, dim_candidate)
PARTS_MANIFEST = "fingerprint.json"
ACTION_KINDS = ("tap", "swipe", "type", "press_enter", "press_back", "press_home", "complete")
TEXT_BUCKETS = 16
DEGENERATE_TOL = 1e-6  # relative: f(s, ·) within this of one row for all distinct actions = degenerate


def states_schema(d: int) -> pa.Schema:
    return pa.schema([("state_key", pa.string()), ("traj_id", pa.string()), ("step_id", pa.int32()),
                      ("event_timestamp", pa.timestamp("us", tz="UTC")), ("embedding", pa.list_(pa.float32(), d)),
                      ("model_hash", pa.string()), ("layer", pa.int32())])


def candidates_schema(d: int) -> pa.Schema:
    return pa.schema([("cand_key", pa.string()), ("state_key", pa.string()), ("traj_id", pa.string()),
                      ("step_id", pa.int32()), ("cand_idx", pa.int32()), ("action", pa.string()),
                      ("event_timestamp", pa.timestamp("us", tz="UTC")), ("embedding", pa.list_(pa.float32(), d)),
                      ("model_hash", pa.string()), ("layer", pa.int32())])


def event_timestamp(step_id: int) -> datetime:
    return EMBED_EPOCH + timedelta(seconds=int(step_id))


def model_hash(path: str | Path, extra: str = "") -> str:
    """sha256 (hex, 16 chars) of a checkpoint folder's config and weight files (+ ``extra``, e.g. the variant)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in {".safetensors", ".bin"} or p.name in {
        "config.json", "adapter_config.json"}))
    if not files:
        raise DigiqError("no config.json / weight files to hash", file=path)
    h = hashlib.sha256(extra.encode())
    for file in files:
        h.update(str(file.relative_to(path)).encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- extractors

class Extractor(Protocol):
    """Turns screenshots + text into f(s) and f(s, a)."""

    dim_state: int
    dim_candidate: int
    reads_elements: bool  # whether states() and candidates() use the DOM elements (else they may be None)

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor: ...  # one row per screenshot

    def states(self, tokens: torch.Tensor, goals: Sequence[str], observations: Sequence[str],
               elements: Sequence[Elements] | None = None) -> np.ndarray: ...

    def candidates(self, tokens: torch.Tensor, size: tuple[int, int], goal: str, observation: str,
                   actions: Sequence[Action], elements: Elements = None) -> np.ndarray: ...


class VLMExtractor:
    """f(s), f(s, a) from hidden layer ``layer`` of a LLaVA-style VLM (shared-prefix cached, screenshot encoded once)."""

    def __init__(self, vlm: VLM, layer: int = 2, pooling: str = "last", batch_size: int = 64):
        self.vlm, self.layer, self.pooling, self.batch_size = vlm, layer, pooling, batch_size
        self.dim_state = self.dim_candidate = int(vlm.hidden_size)
        self.reads_elements = vlm.reading.reads_elements

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.vlm.encode_images(list(images), batch_size=self.batch_size)

    def states(self, tokens: torch.Tensor, goals: Sequence[str], observations: Sequence[str],
               elements: Sequence[Elements] | None = None) -> np.ndarray:
        from digiq.vlm.prompts import state_prompt

        import torch

        pages = elements if elements is not None else [None] * len(goals)
        prompts = [state_prompt(g, self.vlm.reading.observation(o, e), self.vlm.prompt_order)
                   for g, o, e in zip(goals, observations, pages, strict=True)]
        with torch.inference_mode():
            out = self.vlm.forward_features(tokens, prompts, layer=self.layer, pooling=self.pooling,
                                            batch_size=self.batch_size)
        return out.float().cpu().numpy()

    def candidates(self, tokens: torch.Tensor, size: tuple[int, int], goal: str, observation: str,
                   actions: Sequence[Action], elements: Elements = None) -> np.ndarray:
        from digiq.vlm.prompts import build_prompts

        import torch

        prompts = build_prompts(goal, self.vlm.reading.observation(observation, elements), actions,
                                self.vlm.reading.targets(actions, elements), marker="patch", order=self.vlm.prompt_order)
        with torch.inference_mode():
            out = self.vlm.forward_features(tokens, prompts, actions, layer=self.layer, pooling=self.pooling,
                                            image_sizes=[size], batch_size=self.batch_size)
        return out.float().cpu().numpy()


class VisionOnlyExtractor:
    """The "no VLM representation" ablation: raw vision-tower patch features (before the projector), no LM."""

    def __init__(self, vlm: VLM, batch_size: int = 64):
        self.vlm, self.batch_size = vlm, batch_size
        self.dim_vision = int(vlm.config.vision_config.hidden_size) * (
            1 if isinstance(vlm.feature_layer, int) else len(vlm.feature_layer))
        self.dim_state = self.dim_vision
        self.dim_candidate = 2 * self.dim_vision + len(ACTION_KINDS) + 4 + TEXT_BUCKETS
        self.reads_elements = False

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        parts = [self.vlm.vision_features(list(images[i:i + self.batch_size]))
                 for i in range(0, len(images), self.batch_size)]
        return torch.cat(parts).float()

    def states(self, tokens: torch.Tensor, goals: Sequence[str], observations: Sequence[str],
               elements: Sequence[Elements] | None = None) -> np.ndarray:
        return self._patches(tokens).mean(1).cpu().numpy()

    def candidates(self, tokens: torch.Tensor, size: tuple[int, int], goal: str, observation: str,
                   actions: Sequence[Action], elements: Elements = None) -> np.ndarray:
        from digiq.vlm.inputs import action_points, patch_grid, patch_index, square_point

        patches = self._patches(tokens)[0].cpu().numpy()  # [n, dv]
        grid, offset = patch_grid(tokens.shape[1], self.vlm.strategy)
        mean = patches.mean(0)
        rows = []
        for action in actions:
            points = action_points(action)
            under = (patches[patch_index(square_point(points[0], size), grid)] if points
                     else np.zeros(self.dim_vision, np.float32))
            rows.append(np.concatenate([mean, under, action_encoding(action)]))
        return np.stack(rows).astype(np.float32)

    def _patches(self, tokens: torch.Tensor) -> torch.Tensor:
        offset = 1 if self.vlm.strategy == "full" else 0
        return tokens[:, offset:]


def build_extractor(variant: str, model_path: str | Path, *, layer: int, pooling: str, batch_size: int = 64,
                    dtype: str = "auto", device: str = "auto") -> tuple[Extractor, str, str]:
    """(extractor, model hash, dtype name) of an embedding variant — the one recipe shared by the embed stage and
    the live featurizer of online evaluation, so that both compute the same f(s) and f(s, a)."""
    from digiq.vlm import load_vlm

    vlm = load_vlm(model_path, dtype=dtype, device=device)
    dtype_name = str(vlm.dtype).removeprefix("torch.")
    if variant == "no_vlm":
        return VisionOnlyExtractor(vlm, batch_size=batch_size), model_hash(model_path, extra="no_vlm"), dtype_name
    return VLMExtractor(vlm, layer, pooling, batch_size), model_hash(model_path), dtype_name


def featurize(extractor: Extractor, image: Image.Image, goal: str, observation: str,
              actions: Sequence[Action], elements: Elements = None) -> tuple[np.ndarray, np.ndarray]:
    """f(s) [d_s] and f(s, a_k) [K, d_sa] of one state, its screenshot encoded once (as :func:`embed_chunk` does)."""
    tokens = extractor.encode([image])
    f_s = extractor.states(tokens, [goal], [observation], [elements])[0]
    return f_s, extractor.candidates(tokens, image.size, goal, observation, actions, elements)


def action_encoding(action: Action) -> np.ndarray:
    """one-hot(kind) ⊕ (touch y, x, lift y, x) ⊕ hashed character-trigram bag of the typed text (L2-normalised)."""
    kind = np.zeros(len(ACTION_KINDS), np.float32)
    kind[ACTION_KINDS.index(action.kind)] = 1.0
    touch = action.touch_point if action.touch_point is not None else (0.0, 0.0)
    lift = action.lift_point if action.lift_point is not None else (0.0, 0.0)
    text = np.zeros(TEXT_BUCKETS, np.float32)
    padded = f"  {action.typed_text or ''} "
    for i in range(len(padded) - 2) if action.typed_text else ():
        bucket = hashlib.sha256(padded[i:i + 3].encode()).digest()[0] % TEXT_BUCKETS
        text[bucket] += 1.0
    norm = float(np.linalg.norm(text))
    return np.concatenate([kind, np.array([*touch, *lift], np.float32), text / norm if norm else text])


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
        "state_key": [f"{t}/{s}" for t, s in keys], "traj_id": [t for t, _ in keys], "step_id": [s for _, s in keys],
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
            cols["cand_key"].append(f"{traj}/{step}/{idx}")
            cols["state_key"].append(f"{traj}/{step}")
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
    from digiq.atomic import atomic_path, write_json
    from digiq.parallel import Ranks

    ranks = ranks or Ranks()

    if chunk_states < 1:
        raise DigiqError(f"must be ≥ 1, got {chunk_states}", field="chunk_states")
    columns = ["traj_id", "step_id", "goal", "observation", "screenshot", "screenshot_sha256", "action", "elements"]
    steps = dataset.table().select(columns).to_pylist()
    cands = candidate_lists(candidates)
    check_candidate_coverage(steps, cands, candidates_file)
    parts = Path(parts)
    stamp = fingerprint(steps, cands, {**(settings or {}), "model_hash": model_hash, "layer": layer,
                                       "chunk_states": chunk_states, "dims": [extractor.dim_state,
                                                                              extractor.dim_candidate]})
    if ranks.is_main:
        _prepare_parts(parts, stamp)
    ranks.barrier()
    chunks = [steps[i:i + chunk_states] for i in range(0, len(steps), chunk_states)]
    mine = range(*ranks.span(len(chunks)))
    started = time.perf_counter()
    computed = images = resumed = 0
    with _Progress(sum(len(chunks[c]) for c in mine), progress and ranks.is_main) as bar:
        for c in mine:
            chunk = chunks[c]
            s_path, c_path = parts / f"states-{c:06d}.parquet", parts / f"candidates-{c:06d}.parquet"
            if s_path.is_file() and c_path.is_file():
                resumed += 1
                bar.advance(len(chunk), 0, started)
                continue
            result = embed_chunk(dataset, chunk, cands, extractor, model_hash, layer)
            check_embeddings(result.states, result.candidates, extractor.dim_state, extractor.dim_candidate,
                             file=dataset.root)
            for path, table in ((c_path, result.candidates), (s_path, result.states)):
                with atomic_path(path) as tmp:
                    pq.write_table(table, tmp)
            computed += result.computed
            images += result.images
            bar.advance(len(chunk), computed, started)
            if on_chunk is not None:
                on_chunk(c)
    ranks.barrier()
    seconds = time.perf_counter() - started
    computed, images, resumed = (sum(n) for n in zip(*ranks.gather((computed, images, resumed)), strict=True))
    run = EmbedRun(states=len(steps), candidates=sum(len(cands[(r["traj_id"], int(r["step_id"]))]) for r in steps),
                   computed=computed, images=images, seconds=seconds, chunks=len(chunks), resumed_chunks=resumed,
                   dim_state=extractor.dim_state, dim_candidate=extractor.dim_candidate,
                   extra={"processes": ranks.num} if ranks.num > 1 else {})
    if not ranks.is_main:
        return run  # the main process merges and writes
    states_t = pa.concat_tables([pq.read_table(parts / f"states-{c:06d}.parquet") for c in range(len(chunks))])
    cands_t = pa.concat_tables([pq.read_table(parts / f"candidates-{c:06d}.parquet") for c in range(len(chunks))])
    if states_t.num_rows != run.states or cands_t.num_rows != run.candidates:
        raise DigiqError(f"merged parts have {states_t.num_rows} states / {cands_t.num_rows} candidates, expected "
                         f"{run.states} (delete {parts} and rerun)", file=parts)
    check_embeddings(states_t, cands_t, extractor.dim_state, extractor.dim_candidate, file=parts)
    with atomic_path(Path(out)) as tmp:
        tmp.mkdir(parents=True)
        pq.write_table(states_t, tmp / STATES_FILE)
        pq.write_table(cands_t, tmp / CANDIDATES_FILE)
        write_json(tmp / MANIFEST_FILE, {"model_hash": model_hash, "layer": layer, **(settings or {}),
                                            "dim_state": extractor.dim_state,
                                            "dim_candidate": extractor.dim_candidate})
    shutil.rmtree(parts, ignore_errors=True)
    return run


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


class _Progress:
    """A rich progress bar over states, showing computed samples/s (silent when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self._progress: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("embed"), BarColumn(), MofNCompleteColumn(), TextColumn("states"),
                                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("embed", total=self.total, rate="")
        return self

    def advance(self, n: int, computed: int, started: float) -> None:
        if self._progress is not None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            self._progress.update(self._task, advance=n, rate=f"{computed / elapsed:.0f} samples/s")

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
