"""Trajectory store: a dataset folder = Parquet step shards + content-addressed PNG screenshots + manifest.

    DATASET/
      manifest.json                 schema version, γ, source, counts
      steps/<shard>.parquet         one row per step (STEP_SCHEMA), written atomically per shard
      screenshots/ab/abcdef….png    PNG files named by their sha256 (identical frames stored once)

Queries go through DuckDB (``Dataset.query``): the view ``steps`` covers every shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from digiq.actions import format_action, parse_action
from digiq.atomic import atomic_path, write_json
from digiq.errors import DigiqError, first_line
from digiq.parquet import read_table
from digiq.schema import SCHEMA_VERSION, Action, ActionType, Step, Trajectory, discounted_returns

MANIFEST = "manifest.json"
STEPS_DIR = "steps"
SCREENSHOTS_DIR = "screenshots"

STEP_SCHEMA = pa.schema(
    [
        ("traj_id", pa.string()),
        ("step_id", pa.int32()),
        ("task", pa.string()),
        ("seed", pa.int64()),
        ("goal", pa.string()),
        ("observation", pa.string()),
        ("screenshot", pa.string()),
        ("screenshot_sha256", pa.string()),
        ("next_screenshot", pa.string()),
        ("next_screenshot_sha256", pa.string()),
        ("elements", pa.string()),
        ("action", pa.string()),
        ("action_type", pa.string()),
        ("action_kind", pa.string()),
        ("touch_y", pa.float64()),
        ("touch_x", pa.float64()),
        ("lift_y", pa.float64()),
        ("lift_x", pa.float64()),
        ("typed_text", pa.string()),
        ("reward", pa.float64()),
        ("done", pa.bool_()),
        ("mc_return", pa.float64()),
    ]
)
_REQUIRED = [f.name for f in STEP_SCHEMA if f.name not in {"seed", "next_screenshot", "next_screenshot_sha256", "elements"}]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image or an HxWx3 uint8 array (deterministic for equal pixels)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise DigiqError(f"expected an HxWx3 uint8 screenshot, got {image.dtype} {image.shape}", field="screenshot")
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def step_to_row(step: Step) -> dict[str, Any]:
    action = step.action
    row = step.model_dump(exclude={"action"})
    row.update(
        action=format_action(action),
        action_type=action.action_type.value,
        action_kind=action.kind,
        touch_y=action.touch_point[0],
        touch_x=action.touch_point[1],
        lift_y=action.lift_point[0],
        lift_x=action.lift_point[1],
        typed_text=action.typed_text,
    )
    return row


def row_to_step(row: dict[str, Any], source: str | Path = "<row>") -> Step:
    fields = {name: row.get(name) for name in Step.model_fields if name != "action"}
    try:
        return Step(action=parse_action(row["action"]), **fields)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise DigiqError(
            f"trajectory {row.get('traj_id')!r} step {row.get('step_id')}: {problem['msg']}", file=source, field=where
        ) from None
    except DigiqError as exc:
        raise DigiqError(
            f"trajectory {row.get('traj_id')!r} step {row.get('step_id')}: {exc.message}", file=source, field="action"
        ) from None


class DatasetWriter:
    """Writes a dataset folder shard by shard; a finished shard is never rewritten, so writers resume."""

    def __init__(self, root: str | Path, *, gamma: float, source: str, meta: dict[str, Any] | None = None):
        if not 0.0 <= gamma <= 1.0:
            raise DigiqError(f"gamma must be in [0, 1], got {gamma}", field="gamma")
        self.root = Path(root)
        self.gamma = gamma
        self.source = source
        self.meta = dict(meta or {})
        (self.root / STEPS_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / SCREENSHOTS_DIR).mkdir(parents=True, exist_ok=True)

    def put_image(self, image: Any) -> tuple[str, str]:
        """Store a screenshot (PIL image, uint8 array or PNG bytes); return (relative path, sha256)."""
        data = image if isinstance(image, bytes) else encode_png(image)
        digest = sha256_bytes(data)
        rel = f"{SCREENSHOTS_DIR}/{digest[:2]}/{digest}.png"
        path = self.root / rel
        if not path.exists():
            _write_new_file(path, data)
        return rel, digest

    def shard_path(self, name: str) -> Path:
        return self.root / STEPS_DIR / f"{name}.parquet"

    def has_shard(self, name: str) -> bool:
        return self.shard_path(name).exists()

    def write_shard(self, name: str, trajectories: Iterable[Trajectory]) -> int:
        """Write trajectories as one shard (discounted returns filled in with the dataset's γ)."""
        rows = []
        for traj in trajectories:
            returns = discounted_returns([s.reward for s in traj.steps], self.gamma)
            rows.extend(step_to_row(s.model_copy(update={"mc_return": g})) for s, g in zip(traj.steps, returns))
        table = pa.Table.from_pylist(rows, schema=STEP_SCHEMA)
        with atomic_path(self.shard_path(name)) as tmp:
            pq.write_table(table, tmp)
        return len(rows)

    def finalize(self, **extra: Any) -> dict[str, Any]:
        """Check the shards and write the manifest (last, so a dataset with a manifest is complete)."""
        counts = Dataset.count_rows(self.root)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "gamma": self.gamma,
            "source": self.source,
            "n_trajectories": counts["trajectories"],
            "n_steps": counts["steps"],
            **self.meta,
            **extra,
        }
        write_json(self.root / MANIFEST, manifest)
        return manifest


class Dataset:
    """Read access to a dataset folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise DigiqError("not a digiq dataset (no manifest.json; was the writing stage interrupted?)", file=self.root)
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DigiqError(f"invalid JSON ({exc})", file=manifest_path) from None
        if not isinstance(self.manifest, dict):
            raise DigiqError(f"expected a JSON object, got {type(self.manifest).__name__}", file=manifest_path)
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DigiqError(f"schema_version {version!r}, this digiq reads {SCHEMA_VERSION}", file=manifest_path, field="schema_version")
        self._table: pa.Table | None = None

    @property
    def gamma(self) -> float:
        return float(self.manifest["gamma"])

    @staticmethod
    def shard_files(root: str | Path) -> list[Path]:
        return sorted((Path(root) / STEPS_DIR).glob("*.parquet"))

    @staticmethod
    def count_rows(root: str | Path) -> dict[str, int]:
        table = Dataset._read_shards(Dataset.shard_files(root))
        return {"steps": table.num_rows, "trajectories": len(set(table.column("traj_id").to_pylist()))}

    @staticmethod
    def _read_shards(files: list[Path]) -> pa.Table:
        tables = []
        for file in files:
            table = read_table(file)
            missing = [name for name in _REQUIRED if name not in table.column_names]
            if missing:
                raise DigiqError(f"missing column(s) {', '.join(missing)}", file=file, field=missing[0])
            try:
                table = table.select(STEP_SCHEMA.names).cast(STEP_SCHEMA)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
                raise DigiqError(f"columns do not match the step schema ({first_line(exc)})", file=file) from None
            check_step_values(table, file)
            tables.append(table)
        if not tables:
            return STEP_SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def table(self) -> pa.Table:
        """All steps, ordered by (traj_id, step_id)."""
        if self._table is None:
            table = self._read_shards(self.shard_files(self.root))
            self._table = table.sort_by([("traj_id", "ascending"), ("step_id", "ascending")])
        return self._table

    def steps_df(self):  # -> pandas.DataFrame
        return self.table().to_pandas()

    def connect(self):
        """A DuckDB connection with the view ``steps`` (and any extra tables of the dataset) registered."""
        import duckdb

        con = duckdb.connect()
        con.register("steps", self.table())
        for extra in sorted(self.root.glob("*.parquet")):  # DuckDB cannot bind parameters in CREATE VIEW
            con.execute(f"CREATE VIEW {_sql_identifier(extra.stem)} AS SELECT * FROM read_parquet({_sql_string(extra)})")
        return con

    def query(self, sql: str, params: list[Any] | None = None):  # -> pandas.DataFrame
        return self.connect().execute(sql, params or []).df()

    def trajectory_ids(self) -> list[str]:
        return sorted(set(self.table().column("traj_id").to_pylist()))

    def iter_trajectories(self) -> Iterator[Trajectory]:
        rows = self.table().to_pylist()
        start = 0
        for end in range(1, len(rows) + 1):
            if end == len(rows) or rows[end]["traj_id"] != rows[start]["traj_id"]:
                yield self._trajectory(rows[start:end])
                start = end

    def trajectory(self, traj_id: str) -> Trajectory:
        table = self.table()
        import pyarrow.compute as pc

        rows = table.filter(pc.equal(table.column("traj_id"), traj_id)).to_pylist()
        if not rows:
            raise DigiqError(f"no trajectory {traj_id!r}", file=self.root, field="traj_id")
        return self._trajectory(rows)

    def shard_of(self, traj_id: str, step_id: int | None = None) -> Path:
        """The shard holding a step (for error messages; the steps folder when no shard has it)."""
        import pyarrow.compute as pc

        for file in self.shard_files(self.root):
            keys = pq.read_table(file, columns=["traj_id", "step_id"])
            found = pc.equal(keys["traj_id"], traj_id)
            if step_id is not None:
                found = pc.and_(found, pc.equal(keys["step_id"], step_id))
            if pc.any(found).as_py():
                return file
        return self.root / STEPS_DIR

    def _trajectory(self, rows: list[dict[str, Any]]) -> Trajectory:
        try:
            steps = [row_to_step(row) for row in rows]
        except DigiqError as exc:  # the failing step's shard, looked up only now
            raise DigiqError(exc.message, file=self.shard_of(rows[0]["traj_id"]), field=exc.field) from None
        first = steps[0]
        try:
            return Trajectory(traj_id=first.traj_id, task=first.task, goal=first.goal, steps=steps)
        except ValidationError as exc:
            raise DigiqError(exc.errors()[0]["msg"], file=self.root / STEPS_DIR, field=f"trajectory {first.traj_id}") from None

    def image_path(self, rel: str) -> Path:
        return self.root / rel

    def load_image(self, rel: str, expected_sha256: str | None = None):  # -> PIL.Image.Image
        """Open a screenshot, checking it exists, decodes and (optionally) matches its content hash."""
        from PIL import Image, UnidentifiedImageError

        path = self.image_path(rel)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DigiqError("screenshot file is missing", file=path, field="screenshot") from None
        if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
            raise DigiqError("screenshot content does not match its sha256 in the step table", file=path, field="screenshot_sha256")
        try:
            Image.open(io.BytesIO(data)).verify()  # chunk CRCs and IEND: load() alone accepts a truncated file
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL raises SyntaxError on broken PNGs
            raise DigiqError(f"not a readable PNG ({exc})", file=path, field="screenshot") from None
        return image.convert("RGB")

    def action(self, row: dict[str, Any]) -> Action:
        """The parsed action of a step-table row (a DigiqError names the shard, the step and the field)."""
        try:
            return parse_action(row["action"])
        except DigiqError as exc:
            traj_id, step_id = row.get("traj_id"), row.get("step_id")
            raise DigiqError(f"trajectory {traj_id!r} step {step_id}: {exc.message}", file=self.shard_of(traj_id, step_id),
                             field="action") from None


def check_step_values(table: pa.Table, file: str | Path) -> None:
    """What every reader relies on, checked column-wise (cheap): required values present, finite rewards and
    returns, known action types, on-screen points. The action strings themselves are parsed where they are used."""
    import pyarrow.compute as pc

    for name in _REQUIRED:
        if table[name].null_count:
            _bad_rows(table, file, pc.is_null(table[name]), name, "missing value")
    for name in ("reward", "mc_return"):
        finite = pc.is_finite(table[name])
        if not pc.all(finite).as_py():
            _bad_rows(table, file, pc.invert(finite), name, "{value} is not a finite number", name)
    known = pc.is_in(table["action_type"], pa.array([t.value for t in ActionType]))
    if not pc.all(known).as_py():
        _bad_rows(table, file, pc.invert(known), "action_type", "unknown action type {value!r}", "action_type")
    taps = pc.equal(table["action_type"], ActionType.DUAL_POINT.value)
    for name in ("touch_y", "touch_x", "lift_y", "lift_x"):
        outside = pc.and_(taps, pc.or_(pc.less(table[name], 0.0), pc.greater(table[name], 1.0)))
        if pc.any(outside).as_py():
            _bad_rows(table, file, outside, "action", f"{name} {{value}} is outside [0, 1] (expected [y, x] normalised)", name)


def _bad_rows(table: pa.Table, file: str | Path, bad: Any, field: str, message: str, column: str | None = None) -> None:
    """Raise for the first row where ``bad`` holds (``{value}`` in the message: that row's ``column``)."""
    import pyarrow.compute as pc

    row = table.slice(pc.index(bad, True).as_py(), 1).to_pylist()[0]
    count = pc.sum(bad).as_py()
    text = message.format(value=row[column] if column else None)
    raise DigiqError(f"trajectory {row['traj_id']!r} step {row['step_id']}: {text} ({count} row(s) in all)", file=file, field=field)


def _sql_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_string(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _write_new_file(path: Path, data: bytes) -> None:
    """Atomic like digiq.atomic.write_bytes, but through a temporary file rather than a temporary folder:
    creating and removing a folder per screenshot cost ~3 ms each (3 of 5 s importing 1,000 steps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with tmp.open("xb") as f:  # plain open: the file gets the umask's permissions, unlike mkstemp's 0600
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
