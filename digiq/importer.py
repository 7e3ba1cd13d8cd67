"""Import the official Digi-Q / DigiRL trajectory files (DESIGN.md §4) into a digiq dataset.

The official file is a ``torch.save``-d list of trajectories, each a list of step dicts:

    observation, next_observation        "Previous Actions: … Goal: {task}</s>"
    task                                 the goal text (our goal and task)
    image_path, next_image_path          absolute paths of the machine that made the data: resolved by
                                         FILE NAME under the folder the user gives
    image_features, next_image_features  BLIP-2 [1408] or frame-stacked [2816]; numpy or torch
    action                               AutoUI action string (digiq.actions.parse_action)
    reward (0/1), done, trajectory_reward, mc_return
    Digi-Q post-processing adds          action_list ("<split>"-joined candidates, index 0 = the dataset
                                         action), q_rep_out [D], q_rep_out_list [K, D], traj_id, step_id

The output is a normal dataset (steps/*.parquet, screenshots/ by content hash, manifest.json) plus

    candidates.parquet   traj_id, step_id, cand_idx, action[, q_rep_out = q_rep_out_list[cand_idx]]
    precomputed.parquet  traj_id, step_id, image_features, next_image_features, q_rep_out
                         (the arrays present in the file, as fixed-size float32 lists)
    official.parquet     traj_id, step_id, source_index, source_traj_id, next_observation,
                         image_path, next_image_path, trajectory_reward, source_mc_return
                         (what the step table has no column for, kept so nothing of the source is lost)

Safety: the official loader calls ``torch.load(weights_only=False)``, which runs whatever code the
pickle carries. Here the file is first disassembled statically and refused if it names any global
outside ALLOWED (torch tensors, numpy arrays and numeric scalars), then loaded with
``torch.load(weights_only=True)`` under that same allow-list: no other object is ever constructed.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import pickletools
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from digiq.actions import parse_action
from digiq.atomic import atomic_path
from digiq.errors import DigiqError
from digiq.schema import Action, Step, Trajectory, discounted_returns
from digiq.store import SCREENSHOTS_DIR, DatasetWriter, sha256_bytes

REQUIRED_KEYS = ("observation", "next_observation", "task", "image_path", "action", "reward", "done")
STEP_ARRAYS = ("image_features", "next_image_features", "q_rep_out")  # one vector [D] per step
CANDIDATE_SEPARATOR = "<split>"
CANDIDATES_FILE = "candidates.parquet"
PRECOMPUTED_FILE = "precomputed.parquet"
OFFICIAL_FILE = "official.parquet"
SOURCE_NAME = "digiq-official"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# numpy dtype classes a numeric array or scalar needs (unpickling a dtype BUILDs an instance of its class)
NUMPY_DTYPE_CLASSES = (
    "BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "LongLongDType",
    "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "ULongLongDType",
    "Float16DType", "Float32DType", "Float64DType",
)  # fmt: skip


class ImportOptions(BaseModel):
    """How `digiq import-digiq` treats the file."""

    model_config = ConfigDict(extra="forbid")

    gamma: float = Field(0.95, ge=0.0, le=1.0, description="discount γ for the stored mc_return (official: 0.95)")
    skip_bad: bool = Field(False, description="skip (and count) bad trajectories instead of failing on the first")
    overwrite: bool = Field(False, description="replace an existing, non-empty output folder")
    shard_steps: int = Field(5000, ge=1, description="steps per Parquet shard of the step table")
    flush_bytes: int = Field(256 << 20, ge=1, description="flush buffered arrays to Parquet beyond this many bytes")


@dataclass
class ImportReport:
    out: Path
    trajectories: int
    steps: int
    skipped: list[str]
    candidate_rows: int
    precomputed_rows: int
    images: int
    layout: dict[str, int]  # precomputed array -> width (q_rep_out_list: its row width)
    mc_return_max_abs_diff: float | None  # stored returns (γ) vs the file's mc_return
    seconds: float  # the whole import
    load_seconds: float  # of which: the safe torch.load


# --------------------------------------------------------------------------- safe loading


def allowed_globals() -> list[Any]:
    """The only globals an official file may name: numpy array/scalar reconstruction (numpy 1.x and 2.x
    module names) and numeric dtype classes. torch tensors are allowed by torch's weights_only loader."""
    from numpy import dtypes
    from numpy._core import multiarray

    reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    return [
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # files written with numpy 1.x
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        np.ndarray,
        np.dtype,
        *(getattr(dtypes, name) for name in NUMPY_DTYPE_CLASSES),
    ]


def load_official(path: str | Path) -> list[Any]:
    """Load an official trajectory file without executing code from it (see the module docstring)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DigiqError("no such file", file=path)
    with torch.serialization.safe_globals(allowed_globals()):
        _refuse_unlisted_globals(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DigiqError(f"refused: {_unpickling_problem(exc)}; nothing from the file was executed", file=path, field="pickle") from None
        except Exception as exc:  # malformed bytes fail anywhere in torch's parser (IndexError, KeyError, …)
            raise DigiqError(f"not a readable torch.save file ({type(exc).__name__}: {_first_line(exc)})", file=path) from None
    if not isinstance(data, (list, tuple)):
        raise DigiqError(f"expected a list of trajectories (lists of step dicts), got {type(data).__name__}", file=path)
    return list(data)


def _refuse_unlisted_globals(path: Path) -> None:
    """Disassemble the pickle of a torch.save zip (nothing is constructed) and refuse unlisted globals."""
    import torch

    if not zipfile.is_zipfile(path):
        return  # legacy format: torch's restricted unpickler refuses unlisted globals as it meets them
    try:
        unlisted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError, KeyError) as exc:
        raise DigiqError(f"refused: {_unpickling_problem(exc)}; nothing from the file was executed", file=path, field="pickle") from None
    if unlisted:
        raise DigiqError(
            f"refused: unpickling needs {', '.join(sorted(unlisted))}, which is not on the allow-list "
            "(torch tensors, numpy arrays and numeric scalars); nothing from the file was executed",
            file=path,
            field="pickle",
        )


def _unpickling_problem(exc: BaseException | str) -> str:
    """torch's weights_only refusal, in one line: the global it refused, or the opcode it cannot run."""
    text = str(exc)
    if match := re.search(r"GLOBAL ([\w.]+)", text):
        name = match.group(1) if "." in match.group(1) else f"builtins.{match.group(1)}"  # torch drops "builtins."
        return f"unpickling needs {name}, which is not on the allow-list (torch tensors, numpy arrays and numeric scalars)"
    if match := re.search(r"Unsupported operand (\d+)", text):
        opcode = pickletools.code2op.get(chr(int(match.group(1))))
        name = opcode.name if opcode else match.group(1)
        return f"the pickle uses opcode {name}, which the safe loader does not run (torch.save's default protocol 2 does not need it)"
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip()
    return f"the pickle cannot be loaded safely ({_first_line(detail)})"


def _first_line(value: object) -> str:
    lines = str(value).strip().splitlines()
    return lines[0] if lines else type(value).__name__


# --------------------------------------------------------------------------- screenshots


class ImageIndex:
    """The files under --images by name: official paths are absolute paths of another machine."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DigiqError("images folder not found", file=self.root, field="images")
        self.by_name: dict[str, list[Path]] = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                self.by_name.setdefault(path.name, []).append(path)

    def resolve(self, recorded: str, field_name: str) -> Path:
        name = recorded.replace("\\", "/").rsplit("/", 1)[-1]
        found = self.by_name.get(name, [])
        if not found:
            raise _Bad(field_name, f"screenshot {name!r} (recorded as {recorded!r}) not found under {self.root}")
        if len(found) > 1:
            raise _Bad(field_name, f"screenshot name {name!r} is ambiguous under {self.root}: {', '.join(map(str, found[:3]))}")
        return found[0]


def read_screenshot(path: Path, field_name: str) -> bytes:
    """PNG bytes of a screenshot file: PNGs are checked and kept byte for byte, other formats re-encoded."""
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    try:
        if data.startswith(PNG_MAGIC):
            Image.open(io.BytesIO(data)).verify()
            return data
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _Bad(field_name, f"screenshot {path} is not a readable image ({exc})") from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def screenshot_ref(data: bytes) -> tuple[str, str]:
    """(relative path, sha256) under which DatasetWriter.put_image stores these PNG bytes."""
    digest = sha256_bytes(data)
    return f"{SCREENSHOTS_DIR}/{digest[:2]}/{digest}.png", digest


# --------------------------------------------------------------------------- one trajectory


class _Bad(Exception):
    """A problem in one step's field; becomes a DigiqError naming trajectory, step and field."""

    def __init__(self, field_name: str, message: str, step: int | None = None):
        super().__init__(message)
        self.field_name, self.message, self.step = field_name, message, step


@dataclass
class _StepRecord:
    values: dict[str, Any]  # Step fields except screenshots
    image: Path
    next_image: Path | None
    arrays: dict[str, np.ndarray]  # present STEP_ARRAYS
    candidates: list[str] | None
    candidate_reps: np.ndarray | None  # [K, D]
    source: dict[str, Any]  # official.parquet columns


@dataclass
class _TrajectoryRecord:
    index: int
    traj_id: str
    steps: list[_StepRecord]
    layout: dict[str, int]
    images: dict[Path, bytes] = field(default_factory=dict)


def convert_trajectory(raw: Any, index: int, images: ImageIndex) -> _TrajectoryRecord:
    """Check one official trajectory and turn it into records (raises _Bad naming step and field)."""
    if not isinstance(raw, (list, tuple)):
        raise _Bad("trajectory", f"expected a list of step dicts, got {type(raw).__name__}")
    if not raw:
        raise _Bad("trajectory", "has no steps")
    steps = [_convert_step(raw_step, s, len(raw), images) for s, raw_step in enumerate(raw)]
    traj_id = _trajectory_id(steps, index)
    layout = _step_layout(steps[0])
    for s, step in enumerate(steps):
        if step.values["task"] != steps[0].values["task"]:
            raise _Bad("task", f"{step.values['task']!r} differs from step 0's {steps[0].values['task']!r}", s)
        if (found := _step_layout(step)) != layout:
            raise _Bad(_layout_difference(layout, found), f"has {_describe(found)}; step 0 has {_describe(layout)}", s)
        step.values["traj_id"] = traj_id
    return _TrajectoryRecord(index=index, traj_id=traj_id, steps=steps, layout=layout)


def _convert_step(raw: Any, s: int, length: int, images: ImageIndex) -> _StepRecord:
    try:
        return _convert_step_fields(raw, s, length, images)
    except _Bad as bad:
        bad.step = s
        raise


def _convert_step_fields(raw: Any, s: int, length: int, images: ImageIndex) -> _StepRecord:
    if not isinstance(raw, dict):
        raise _Bad("step", f"expected a dict, got {type(raw).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise _Bad(missing[0], f"missing key(s) {', '.join(missing)}")
    if "step_id" in raw and raw["step_id"] is not None and (step_id := _integer(raw["step_id"], "step_id")) != s:
        raise _Bad("step_id", f"step ids out of order: position {s} has step_id {step_id}")
    task = _text(raw["task"], "task")
    if not task:
        raise _Bad("task", "is empty")
    action = _action(raw["action"], "action")
    done = _flag(raw["done"], "done")
    if done and s != length - 1:
        raise _Bad("done", f"is true but the trajectory goes on for {length - 1 - s} more step(s)")
    next_image_path = raw.get("next_image_path")
    arrays = {name: _vector(raw[name], name) for name in STEP_ARRAYS if raw.get(name) is not None}
    if "image_features" in arrays and "next_image_features" in arrays:
        _same_width(arrays["image_features"], arrays["next_image_features"], "next_image_features")
    candidates = _candidates(raw.get("action_list"), action)
    candidate_reps = _candidate_reps(raw.get("q_rep_out_list"), candidates, arrays.get("q_rep_out"))
    return _StepRecord(
        values={
            "step_id": s,
            "task": task,
            "goal": task,
            "observation": _text(raw["observation"], "observation"),
            "action": action,
            "reward": _binary(raw["reward"], "reward"),
            "done": done,
        },
        image=images.resolve(_text(raw["image_path"], "image_path"), "image_path"),
        next_image=None if next_image_path is None else images.resolve(_text(next_image_path, "next_image_path"), "next_image_path"),
        arrays=arrays,
        candidates=candidates,
        candidate_reps=candidate_reps,
        source={
            "source_traj_id": _identifier(raw.get("traj_id"), "traj_id"),
            "next_observation": _text(raw["next_observation"], "next_observation"),
            "image_path": raw["image_path"],
            "next_image_path": next_image_path,
            "trajectory_reward": _optional_number(raw.get("trajectory_reward"), "trajectory_reward"),
            "source_mc_return": _optional_number(raw.get("mc_return"), "mc_return"),
        },
    )


def _trajectory_id(steps: list[_StepRecord], index: int) -> str:
    """The source traj_id (zero-padded when an integer), else the position in the file."""
    ids = {step.source["source_traj_id"] for step in steps}
    if len(ids) > 1:
        first = steps[0].source["source_traj_id"]
        s = next(i for i, step in enumerate(steps) if step.source["source_traj_id"] != first)
        raise _Bad("traj_id", f"{steps[s].source['source_traj_id']!r} differs from step 0's {first!r}", s)
    source_id = ids.pop()
    if source_id is None:
        return f"{index:06d}"
    return f"{int(source_id):06d}" if re.fullmatch(r"\d+", source_id) else source_id


def _step_layout(step: _StepRecord) -> dict[str, int]:
    layout = {name: int(array.shape[0]) for name, array in step.arrays.items()}
    if step.candidate_reps is not None:
        layout["q_rep_out_list"] = int(step.candidate_reps.shape[1])
    if step.candidates is not None:
        layout["action_list"] = 0  # a presence marker: the number of candidates may vary
    return layout


def _layout_difference(expected: dict[str, int], found: dict[str, int]) -> str:
    return next(name for name in sorted(set(expected) | set(found)) if expected.get(name) != found.get(name))


def _describe(layout: dict[str, int]) -> str:
    """e.g. ``image_features [1408], q_rep_out_list [K, 4096], action_list``."""
    parts = [
        name if name == "action_list" else f"{name} [K, {width}]" if name == "q_rep_out_list" else f"{name} [{width}]"
        for name, width in sorted(layout.items())
    ]
    return ", ".join(parts) or "no arrays"


# --------------------------------------------------------------------------- field coercion


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Bad(name, f"expected a string, got {type(value).__name__}")
    return value


def _action(value: Any, name: str) -> Action:
    try:
        return parse_action(_text(value, name))
    except DigiqError as exc:
        raise _Bad(name, exc.message) from None


def _scalar(value: Any, name: str) -> float:
    """A Python, numpy or 0-d/1-element torch number as a finite float."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise _Bad(name, f"expected a single number, got an array of shape {tuple(value.shape)}")
        value = value.reshape(()).item()
    if not isinstance(value, (bool, int, float, np.bool_, np.number)) or isinstance(value, np.complexfloating):
        raise _Bad(name, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise _Bad(name, f"{number} is not a finite number")
    return number


def _binary(value: Any, name: str) -> float:
    number = _scalar(value, name)
    if number not in (0.0, 1.0):
        raise _Bad(name, f"expected 0 or 1, got {number:g}")
    return number


def _flag(value: Any, name: str) -> bool:
    return _binary(value, name) == 1.0


def _integer(value: Any, name: str) -> int:
    number = _scalar(value, name)
    if number != int(number) or number < 0:
        raise _Bad(name, f"expected a non-negative integer, got {number:g}")
    return int(number)


def _optional_number(value: Any, name: str) -> float | None:
    return None if value is None else _scalar(value, name)


def _identifier(value: Any, name: str) -> str | None:
    """A traj_id as text: strings as they are, numbers (Python, numpy, torch) as their integer."""
    if value is None or isinstance(value, str):
        return value
    return str(_integer(value, name))


def _array(value: Any, name: str) -> np.ndarray:
    """A numpy array or torch tensor of floats as a float32 numpy array (finite values only)."""
    if hasattr(value, "detach"):  # torch tensor; bf16/fp16 widen to float32 first
        tensor = value.detach().cpu()
        value = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    if not isinstance(value, np.ndarray):
        raise _Bad(name, f"expected a numpy array or torch tensor, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise _Bad(name, f"expected floating-point values, got dtype {value.dtype}")
    array = np.ascontiguousarray(value, dtype=np.float32)
    if not np.isfinite(array).all():
        raise _Bad(name, "contains NaN or infinite values")
    return array


def _vector(value: Any, name: str) -> np.ndarray:
    array = _array(value, name)
    if array.ndim != 1 or array.shape[0] == 0:
        raise _Bad(name, f"expected a vector [D], got shape {list(array.shape)}")
    return array


def _same_width(reference: np.ndarray, other: np.ndarray, name: str) -> None:
    if other.shape != reference.shape:
        raise _Bad(name, f"shape {list(other.shape)} differs from {list(reference.shape)}")


def _candidates(value: Any, action: Action) -> list[str] | None:
    """Split action_list; every candidate must parse and candidate 0 must be the dataset action."""
    if value is None:
        return None
    if isinstance(value, str):
        candidates = value.split(CANDIDATE_SEPARATOR)
    elif isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value):
        candidates = list(value)
    else:
        raise _Bad("action_list", f'expected candidates joined by "{CANDIDATE_SEPARATOR}", got {type(value).__name__}')
    parsed = [_action(candidate, f"action_list[{i}]") for i, candidate in enumerate(candidates)]
    if _decision(parsed[0]) != _decision(action):
        raise _Bad("action_list[0]", f"candidate 0 {candidates[0]!r} is not the dataset action")
    return candidates


def _decision(action: Action) -> tuple[Any, ...]:
    return (action.action_type, action.touch_point, action.lift_point, action.typed_text)


def _candidate_reps(value: Any, candidates: list[str] | None, q_rep_out: np.ndarray | None) -> np.ndarray | None:
    if value is None:
        return None
    array = _array(value, "q_rep_out_list")
    if candidates is None:
        raise _Bad("q_rep_out_list", "is present but action_list is not (one row per candidate)")
    if array.ndim != 2 or array.shape[0] != len(candidates):
        raise _Bad("q_rep_out_list", f"expected shape [{len(candidates)}, D] (one row per candidate), got {list(array.shape)}")
    if q_rep_out is not None and array.shape[1] != q_rep_out.shape[0]:
        raise _Bad("q_rep_out_list", f"row width {array.shape[1]} differs from q_rep_out's {q_rep_out.shape[0]}")
    return array


# --------------------------------------------------------------------------- writing


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


class _DatasetBuilder:
    """Collects checked trajectories and writes them (step shards, screenshots, extra tables)."""

    def __init__(self, root: Path, options: ImportOptions, meta: dict[str, Any]):
        self.root, self.options = root, options
        self.writer = DatasetWriter(root, gamma=options.gamma, source=SOURCE_NAME, meta=meta)
        self.layout: dict[str, int] | None = None
        self.pending: list[tuple[Trajectory, _TrajectoryRecord]] = []
        self.pending_steps = self.pending_bytes = self.shards = 0
        self.traj_ids: set[str] = set()
        self.images: dict[Path, tuple[str, str]] = {}  # source file -> (relative path, sha256), once stored
        self.candidates_per_step: set[int] = set()
        self.streams: dict[str, _ParquetStream] = {}
        self.max_return_diff: float | None = None
        self.steps = 0

    def add(self, record: _TrajectoryRecord) -> None:
        """Check the trajectory against the file's layout, then store its screenshots and queue it."""
        if self.layout is not None and record.layout != self.layout:
            name = _layout_difference(self.layout, record.layout)
            raise _Bad(name, f"has {_describe(record.layout)}; the file's first trajectory has {_describe(self.layout)}", 0)
        if record.traj_id in self.traj_ids:
            raise _Bad("traj_id", f"{record.traj_id!r} is used by an earlier trajectory", 0)
        trajectory = self._trajectory(record)
        for path, data in record.images.items():
            self.images[path] = self.writer.put_image(data)
        self.layout = record.layout
        self.traj_ids.add(record.traj_id)
        self.pending.append((trajectory, record))
        self.pending_steps += len(record.steps)
        self.pending_bytes += sum(a.nbytes for step in record.steps for a in [*step.arrays.values(), *_maybe(step.candidate_reps)])
        if self.pending_steps >= self.options.shard_steps or self.pending_bytes >= self.options.flush_bytes:
            self.flush()

    def _trajectory(self, record: _TrajectoryRecord) -> Trajectory:
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
                raise _Bad(".".join(map(str, problem["loc"])) or "step", problem["msg"], s) from None
        first = record.steps[0].values
        try:
            return Trajectory(traj_id=record.traj_id, task=first["task"], goal=first["goal"], steps=steps)
        except ValidationError as exc:
            raise _Bad("trajectory", exc.errors()[0]["msg"]) from None

    def _screenshot(self, path: Path, field_name: str, record: _TrajectoryRecord, s: int) -> tuple[str, str]:
        if path in self.images:
            return self.images[path]
        if path not in record.images:
            try:
                record.images[path] = read_screenshot(path, field_name)
            except _Bad as bad:
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
            stored = discounted_returns([s.reward for s in trajectory.steps], self.options.gamma)
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


# --------------------------------------------------------------------------- entry point


def import_official(
    path: str | Path,
    images: str | Path,
    out: str | Path,
    options: ImportOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import an official Digi-Q/DigiRL ``.pt`` file into the dataset folder ``out`` (atomically).

    Bad trajectories raise a DigiqError naming the trajectory, step and field, and nothing is written;
    with ``options.skip_bad`` they are skipped and listed in the report instead.
    ``progress(done, total)`` is called after each trajectory.
    """
    options = options or ImportOptions()
    start = time.perf_counter()
    path, out = Path(path), Path(out)
    _check_output(out, options.overwrite)
    index = ImageIndex(images)
    loading = time.perf_counter()
    data = load_official(path)
    load_seconds = time.perf_counter() - loading
    if not data:
        raise DigiqError("the file holds no trajectories", file=path)
    skipped: list[str] = []
    meta = {"source_file": path.name, "source_sha256": _file_sha256(path), "importer": "digiq import-digiq"}
    with atomic_path(out) as root:
        builder = _DatasetBuilder(root, options, meta)
        try:
            for t, raw in enumerate(data):
                try:
                    builder.add(convert_trajectory(raw, t, index))
                except _Bad as bad:
                    error = _trajectory_error(path, t, raw, bad)
                    if not options.skip_bad:
                        raise error from None
                    skipped.append(str(error))
                if progress is not None:
                    progress(t + 1, len(data))
            if not builder.traj_ids:
                raise DigiqError(f"no valid trajectory ({len(skipped)} skipped; first: {skipped[0]})", file=path)
            builder.finish(skipped_trajectories=len(skipped))
        finally:
            builder.close()
        report = ImportReport(
            out=out,
            trajectories=len(builder.traj_ids),
            steps=builder.steps,
            skipped=skipped,
            candidate_rows=builder.streams[CANDIDATES_FILE].rows if CANDIDATES_FILE in builder.streams else 0,
            precomputed_rows=builder.streams[PRECOMPUTED_FILE].rows if PRECOMPUTED_FILE in builder.streams else 0,
            images=len(builder.images),
            layout=array_widths(builder.layout),
            mc_return_max_abs_diff=builder.max_return_diff,
            seconds=0.0,
            load_seconds=load_seconds,
        )
    report.seconds = time.perf_counter() - start
    return report


def _trajectory_error(path: Path, t: int, raw: Any, bad: _Bad) -> DigiqError:
    where = f"trajectory {t}"
    source_id = _peek_traj_id(raw)
    if source_id is not None and source_id != str(t):
        where += f" (traj_id {source_id})"
    if bad.step is not None:
        where += f", step {bad.step}"
    return DigiqError(bad.message, file=path, field=f"{where}, {bad.field_name}")


def _peek_traj_id(raw: Any) -> str | None:
    """The source traj_id of a (possibly bad) trajectory, for error messages."""
    if not (isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], dict)):
        return None
    try:
        return _identifier(raw[0].get("traj_id"), "traj_id")
    except _Bad:
        return None


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DigiqError("exists and is not a folder", file=out, field="out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DigiqError("exists and is not empty (pass --overwrite to replace it)", file=out, field="out")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
