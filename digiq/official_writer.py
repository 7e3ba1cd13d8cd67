"""Write checked official trajectories as a digiq dataset, in batches: the step table (Parquet shards),
screenshots by content hash, manifest.json, and the tables the step table has no column for:

    candidates.parquet   traj_id, step_id, cand_idx, action[, q_rep_out = q_rep_out_list[cand_idx]]
    precomputed.parquet  traj_id, step_id, image_features, next_image_features, q_rep_out
                         (the arrays present in the file, as fixed-size float32 lists)
    official.parquet     traj_id, step_id, source_index, source_traj_id, next_observation,
                         image_path, next_image_path, trajectory_reward, source_mc_return
                         (kept so nothing of the source is lost)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from digiq.official_steps import STEP_ARRAYS, BadField, TrajectoryRecord, describe_layout, layout_difference, read_screenshot, screenshot_ref
from digiq.schema import Step, Trajectory, discounted_returns
from digiq.store import DatasetWriter

CANDIDATES_FILE = "candidates.parquet"
PRECOMPUTED_FILE = "precomputed.parquet"
OFFICIAL_FILE = "official.parquet"
SOURCE_NAME = "digiq-official"


def _vectors(arrays: list[np.ndarray], width: int) -> pa.Array:
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)


def _vector_type(width: int) -> pa.DataType:
    return pa.list_(pa.float32(), width)


OFFICIAL_SCHEMA = pa.schema(
    [
        ("traj_id", pa.string()),
        ("step_id", pa.int32()),
        ("source_index", pa.int32()),
        ("source_traj_id", pa.string()),
        ("next_observation", pa.string()),
        ("image_path", pa.string()),
        ("next_image_path", pa.string()),
        ("trajectory_reward", pa.float64()),
        ("source_mc_return", pa.float64()),
    ]
)


class _ParquetStream:
    """One Parquet file written in batches (opened at the first batch)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.rows = path, schema, 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, columns: dict[str, Any]) -> None:
        table = pa.table(columns, schema=self.schema)
        if table.num_rows == 0:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class DatasetBuilder:
    """Collects checked trajectories and writes them (step shards, screenshots, extra tables)."""

    def __init__(self, root: Path, meta: dict[str, Any], *, gamma: float, shard_steps: int, flush_bytes: int):
        """``gamma``: discount of the stored mc_return; a shard is written every ``shard_steps`` steps or once
        the buffered arrays exceed ``flush_bytes``."""
        self.root, self.gamma, self.shard_steps, self.flush_bytes = root, gamma, shard_steps, flush_bytes
        self.writer = DatasetWriter(root, gamma=gamma, source=SOURCE_NAME, meta=meta)
        self.layout: dict[str, int] | None = None
        self.pending: list[tuple[Trajectory, TrajectoryRecord]] = []
        self.pending_steps = self.pending_bytes = self.shards = 0
        self.traj_ids: set[str] = set()
        self.images: dict[Path, tuple[str, str]] = {}  # source file -> (relative path, sha256), once stored
        self.candidates_per_step: set[int] = set()
        self.streams: dict[str, _ParquetStream] = {}
        self.max_return_diff: float | None = None
        self.steps = 0

    def add(self, record: TrajectoryRecord) -> None:
        """Check the trajectory against the file's layout, then store its screenshots and queue it."""
        if self.layout is not None and record.layout != self.layout:
            name = layout_difference(self.layout, record.layout)
            raise BadField(name, f"has {describe_layout(record.layout)}; the file's first trajectory has {describe_layout(self.layout)}", 0)
        if record.traj_id in self.traj_ids:
            raise BadField("traj_id", f"{record.traj_id!r} is used by an earlier trajectory", 0)
        trajectory = self._trajectory(record)
        for path, data in record.images.items():
            self.images[path] = self.writer.put_image(data)
        self.layout = record.layout
        self.traj_ids.add(record.traj_id)
        self.pending.append((trajectory, record))
        self.pending_steps += len(record.steps)
        self.pending_bytes += sum(a.nbytes for step in record.steps for a in [*step.arrays.values(), *_maybe(step.candidate_reps)])
        if self.pending_steps >= self.shard_steps or self.pending_bytes >= self.flush_bytes:
            self.flush()

    def _trajectory(self, record: TrajectoryRecord) -> Trajectory:
        """Read and check screenshots (kept in record.images until the trajectory is accepted), build Steps."""
        steps = []
        for s, step in enumerate(record.steps):
            screenshot = self._screenshot(step.image, "image_path", record, s)
            shot = {"screenshot": screenshot[0], "screenshot_sha256": screenshot[1]}
            if step.next_image is not None:
                rel, sha = self._screenshot(step.next_image, "next_image_path", record, s)
                shot |= {"next_screenshot": rel, "next_screenshot_sha256": sha}
            try:
                steps.append(Step(**step.values, **shot))
            except ValidationError as exc:
                problem = exc.errors()[0]
                raise BadField(".".join(map(str, problem["loc"])) or "step", problem["msg"], s) from None
        first = record.steps[0].values
        try:
            return Trajectory(traj_id=record.traj_id, task=first["task"], goal=first["goal"], steps=steps)
        except ValidationError as exc:
            raise BadField("trajectory", exc.errors()[0]["msg"]) from None

    def _screenshot(self, path: Path, field_name: str, record: TrajectoryRecord, s: int) -> tuple[str, str]:
        if path in self.images:
            return self.images[path]
        if path not in record.images:
            try:
                record.images[path] = read_screenshot(path, field_name)
            except BadField as bad:
                bad.step = s
                raise
        return screenshot_ref(record.images[path])

    def flush(self) -> None:
        if not self.pending:
            return
        self.writer.write_shard(f"part-{self.shards:05d}", [trajectory for trajectory, _ in self.pending])
        self.shards += 1
        self.steps += self.pending_steps
        self._compare_returns()
        self._write_official()
        self._write_precomputed()
        self._write_candidates()
        self.pending, self.pending_steps, self.pending_bytes = [], 0, 0

    def _keys(self) -> tuple[list[str], list[int]]:
        keys = [(t.traj_id, s.step_id) for t, _ in self.pending for s in t.steps]
        return [k[0] for k in keys], [k[1] for k in keys]

    def _write_official(self) -> None:
        traj_ids, step_ids = self._keys()
        source = [(record.index, step.source) for _, record in self.pending for step in record.steps]
        columns: dict[str, Any] = {"traj_id": traj_ids, "step_id": step_ids, "source_index": [i for i, _ in source]}
        for name in OFFICIAL_SCHEMA.names[3:]:
            columns[name] = [values[name] for _, values in source]
        self._stream(OFFICIAL_FILE, OFFICIAL_SCHEMA).write(columns)

    def _compare_returns(self) -> None:
        """Largest |G_t(γ) − the file's mc_return|: non-zero when the file was made with another γ."""
        for trajectory, record in self.pending:
            stored = discounted_returns([s.reward for s in trajectory.steps], self.gamma)
            source = [step.source["source_mc_return"] for step in record.steps]
            diffs = [abs(a - b) for a, b in zip(stored, source) if b is not None]
            if diffs:
                self.max_return_diff = max(self.max_return_diff or 0.0, *diffs)

    def _write_precomputed(self) -> None:
        names = [name for name in STEP_ARRAYS if name in (self.layout or {})]
        if not names:
            return
        schema = pa.schema([("traj_id", pa.string()), ("step_id", pa.int32())] + [(n, _vector_type(self.layout[n])) for n in names])
        traj_ids, step_ids = self._keys()
        columns: dict[str, Any] = {"traj_id": traj_ids, "step_id": step_ids}
        for name in names:
            columns[name] = _vectors([step.arrays[name] for _, record in self.pending for step in record.steps], self.layout[name])
        self._stream(PRECOMPUTED_FILE, schema).write(columns)

    def _write_candidates(self) -> None:
        if "action_list" not in (self.layout or {}):
            return
        width = (self.layout or {}).get("q_rep_out_list")
        fields = [("traj_id", pa.string()), ("step_id", pa.int32()), ("cand_idx", pa.int32()), ("action", pa.string())]
        schema = pa.schema(fields + ([("q_rep_out", _vector_type(width))] if width else []))
        columns: dict[str, list[Any]] = {"traj_id": [], "step_id": [], "cand_idx": [], "action": []}
        reps = []
        for trajectory, record in self.pending:
            for step, source_step in zip(trajectory.steps, record.steps):
                candidates = source_step.candidates or []
                self.candidates_per_step.add(len(candidates))
                columns["traj_id"] += [trajectory.traj_id] * len(candidates)
                columns["step_id"] += [step.step_id] * len(candidates)
                columns["cand_idx"] += list(range(len(candidates)))
                columns["action"] += candidates
                reps.extend(_maybe(source_step.candidate_reps))
        if width:
            columns["q_rep_out"] = _vectors(reps, width)
        self._stream(CANDIDATES_FILE, schema).write(columns)

    def _stream(self, name: str, schema: pa.Schema) -> _ParquetStream:
        if name not in self.streams:
            self.streams[name] = _ParquetStream(self.root / name, schema)
        return self.streams[name]

    def rows(self, name: str) -> int:
        """Rows written to the extra table ``name`` (0 when the file had nothing for it)."""
        return self.streams[name].rows if name in self.streams else 0

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()

    def finish(self, **extra: Any) -> dict[str, Any]:
        self.flush()
        self.close()
        per_step = sorted(self.candidates_per_step)
        return self.writer.finalize(
            array_widths=array_widths(self.layout),
            candidates_per_step=(per_step[0] if len(per_step) == 1 else per_step) if per_step else None,
            extra_tables=sorted(self.streams),
            **extra,
        )


def array_widths(layout: dict[str, int] | None) -> dict[str, int]:
    """The widths of the precomputed arrays (q_rep_out_list: of its rows), without the action_list marker."""
    return {name: width for name, width in (layout or {}).items() if name != "action_list"}


def _maybe(array: np.ndarray | None) -> list[np.ndarray]:
    return [] if array is None else [array]
