"""Check the trajectories of an official Digi-Q / DigiRL file and turn them into records for the dataset.

Each trajectory is a list of step dicts:

    observation, next_observation        "Previous Actions: … Goal: {task}</s>"
    task                                 the goal text (our goal and task)
    image_path, next_image_path          absolute paths of the machine that made the data: resolved by
                                         FILE NAME under the folder the user gives
    image_features, next_image_features  BLIP-2 [1408] or frame-stacked [2816]; numpy or torch
    action                               AutoUI action string (digiq.actions.parse_action)
    reward (0/1), done, trajectory_reward, mc_return
    Digi-Q post-processing adds          action_list ("<split>"-joined candidates, index 0 = the dataset
                                         action), q_rep_out [D], q_rep_out_list [K, D], traj_id, step_id

A bad field raises :class:`BadField` naming the step and the field; :func:`trajectory_error` turns it into
the DigiqError the user sees (file, trajectory, step, field).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digiq.actions import parse_action
from digiq.errors import DigiqError
from digiq.schema import Action
from digiq.store import SCREENSHOTS_DIR, sha256_bytes

REQUIRED_KEYS = ("observation", "next_observation", "task", "image_path", "action", "reward", "done")
STEP_ARRAYS = ("image_features", "next_image_features", "q_rep_out")  # one vector [D] per step
CANDIDATE_SEPARATOR = "<split>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadField(Exception):
    """A problem in one step's field; becomes a DigiqError naming trajectory, step and field."""

    def __init__(self, field_name: str, message: str, step: int | None = None):
        super().__init__(message)
        self.field_name, self.message, self.step = field_name, message, step


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
            raise BadField(field_name, f"screenshot {name!r} (recorded as {recorded!r}) not found under {self.root}")
        if len(found) > 1:
            raise BadField(field_name, f"screenshot name {name!r} is ambiguous under {self.root}: {', '.join(map(str, found[:3]))}")
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
        raise BadField(field_name, f"screenshot {path} is not a readable image ({exc})") from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def screenshot_ref(data: bytes) -> tuple[str, str]:
    """(relative path, sha256) under which DatasetWriter.put_image stores these PNG bytes."""
    digest = sha256_bytes(data)
    return f"{SCREENSHOTS_DIR}/{digest[:2]}/{digest}.png", digest


# --------------------------------------------------------------------------- one trajectory


@dataclass
class StepRecord:
    values: dict[str, Any]  # Step fields except screenshots
    image: Path
    next_image: Path | None
    arrays: dict[str, np.ndarray]  # present STEP_ARRAYS
    candidates: list[str] | None
    candidate_reps: np.ndarray | None  # [K, D]
    source: dict[str, Any]  # official.parquet columns


@dataclass
class TrajectoryRecord:
    index: int
    traj_id: str
    steps: list[StepRecord]
    layout: dict[str, int]
    images: dict[Path, bytes] = field(default_factory=dict)


def convert_trajectory(raw: Any, index: int, images: ImageIndex) -> TrajectoryRecord:
    """Check one official trajectory and turn it into records (raises BadField naming step and field)."""
    if not isinstance(raw, (list, tuple)):
        raise BadField("trajectory", f"expected a list of step dicts, got {type(raw).__name__}")
    if not raw:
        raise BadField("trajectory", "has no steps")
    steps = [_convert_step(raw_step, s, len(raw), images) for s, raw_step in enumerate(raw)]
    traj_id = _trajectory_id(steps, index)
    layout = _step_layout(steps[0])
    for s, step in enumerate(steps):
        if step.values["task"] != steps[0].values["task"]:
            raise BadField("task", f"{step.values['task']!r} differs from step 0's {steps[0].values['task']!r}", s)
        if (found := _step_layout(step)) != layout:
            raise BadField(layout_difference(layout, found), f"has {describe_layout(found)}; step 0 has {describe_layout(layout)}", s)
        step.values["traj_id"] = traj_id
    return TrajectoryRecord(index=index, traj_id=traj_id, steps=steps, layout=layout)


def _convert_step(raw: Any, s: int, length: int, images: ImageIndex) -> StepRecord:
    try:
        return _convert_step_fields(raw, s, length, images)
    except BadField as bad:
        bad.step = s
        raise


def _convert_step_fields(raw: Any, s: int, length: int, images: ImageIndex) -> StepRecord:
    if not isinstance(raw, dict):
        raise BadField("step", f"expected a dict, got {type(raw).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise BadField(missing[0], f"missing key(s) {', '.join(missing)}")
    if "step_id" in raw and raw["step_id"] is not None and (step_id := _integer(raw["step_id"], "step_id")) != s:
        raise BadField("step_id", f"step ids out of order: position {s} has step_id {step_id}")
    task = _text(raw["task"], "task")
    if not task:
        raise BadField("task", "is empty")
    action = _action(raw["action"], "action")
    done = _flag(raw["done"], "done")
    if done and s != length - 1:
        raise BadField("done", f"is true but the trajectory goes on for {length - 1 - s} more step(s)")
    next_image_path = raw.get("next_image_path")
    arrays = {name: _vector(raw[name], name) for name in STEP_ARRAYS if raw.get(name) is not None}
    if "image_features" in arrays and "next_image_features" in arrays:
        _same_width(arrays["image_features"], arrays["next_image_features"], "next_image_features")
    candidates = _candidates(raw.get("action_list"), action)
    candidate_reps = _candidate_reps(raw.get("q_rep_out_list"), candidates, arrays.get("q_rep_out"))
    return StepRecord(
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


def _trajectory_id(steps: list[StepRecord], index: int) -> str:
    """The source traj_id (zero-padded when an integer), else the position in the file."""
    ids = {step.source["source_traj_id"] for step in steps}
    if len(ids) > 1:
        first = steps[0].source["source_traj_id"]
        s = next(i for i, step in enumerate(steps) if step.source["source_traj_id"] != first)
        raise BadField("traj_id", f"{steps[s].source['source_traj_id']!r} differs from step 0's {first!r}", s)
    source_id = ids.pop()
    if source_id is None:
        return f"{index:06d}"
    return f"{int(source_id):06d}" if re.fullmatch(r"\d+", source_id) else source_id


def _step_layout(step: StepRecord) -> dict[str, int]:
    layout = {name: int(array.shape[0]) for name, array in step.arrays.items()}
    if step.candidate_reps is not None:
        layout["q_rep_out_list"] = int(step.candidate_reps.shape[1])
    if step.candidates is not None:
        layout["action_list"] = 0  # a presence marker: the number of candidates may vary
    return layout


def layout_difference(expected: dict[str, int], found: dict[str, int]) -> str:
    return next(name for name in sorted(set(expected) | set(found)) if expected.get(name) != found.get(name))


def describe_layout(layout: dict[str, int]) -> str:
    """e.g. ``image_features [1408], q_rep_out_list [K, 4096], action_list``."""
    parts = [
        name if name == "action_list" else f"{name} [K, {width}]" if name == "q_rep_out_list" else f"{name} [{width}]"
        for name, width in sorted(layout.items())
    ]
    return ", ".join(parts) or "no arrays"


# --------------------------------------------------------------------------- field coercion


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadField(name, f"expected a string, got {type(value).__name__}")
    return value


def _action(value: Any, name: str) -> Action:
    try:
        return parse_action(_text(value, name))
    except DigiqError as exc:
        raise BadField(name, exc.message) from None


def _scalar(value: Any, name: str) -> float:
    """A Python, numpy or 0-d/1-element torch number as a finite float."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise BadField(name, f"expected a single number, got an array of shape {tuple(value.shape)}")
        value = value.reshape(()).item()
    if not isinstance(value, (bool, int, float, np.bool_, np.number)) or isinstance(value, np.complexfloating):
        raise BadField(name, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise BadField(name, f"{number} is not a finite number")
    return number


def _binary(value: Any, name: str) -> float:
    number = _scalar(value, name)
    if number not in (0.0, 1.0):
        raise BadField(name, f"expected 0 or 1, got {number:g}")
    return number


def _flag(value: Any, name: str) -> bool:
    return _binary(value, name) == 1.0


def _integer(value: Any, name: str) -> int:
    number = _scalar(value, name)
    if number != int(number) or number < 0:
        raise BadField(name, f"expected a non-negative integer, got {number:g}")
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
        raise BadField(name, f"expected a numpy array or torch tensor, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise BadField(name, f"expected floating-point values, got dtype {value.dtype}")
    array = np.ascontiguousarray(value, dtype=np.float32)
    if not np.isfinite(array).all():
        raise BadField(name, "contains NaN or infinite values")
    return array


def _vector(value: Any, name: str) -> np.ndarray:
    array = _array(value, name)
    if array.ndim != 1 or array.shape[0] == 0:
        raise BadField(name, f"expected a vector [D], got shape {list(array.shape)}")
    return array


def _same_width(reference: np.ndarray, other: np.ndarray, name: str) -> None:
    if other.shape != reference.shape:
        raise BadField(name, f"shape {list(other.shape)} differs from {list(reference.shape)}")


def _candidates(value: Any, action: Action) -> list[str] | None:
    """Split action_list; every candidate must parse and candidate 0 must be the dataset action."""
    if value is None:
        return None
    if isinstance(value, str):
        candidates = value.split(CANDIDATE_SEPARATOR)
    elif isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value):
        candidates = list(value)
    else:
        raise BadField("action_list", f'expected candidates joined by "{CANDIDATE_SEPARATOR}", got {type(value).__name__}')
    parsed = [_action(candidate, f"action_list[{i}]") for i, candidate in enumerate(candidates)]
    if _decision(parsed[0]) != _decision(action):
        raise BadField("action_list[0]", f"candidate 0 {candidates[0]!r} is not the dataset action")
    return candidates


def _decision(action: Action) -> tuple[Any, ...]:
    return (action.action_type, action.touch_point, action.lift_point, action.typed_text)


def _candidate_reps(value: Any, candidates: list[str] | None, q_rep_out: np.ndarray | None) -> np.ndarray | None:
    if value is None:
        return None
    array = _array(value, "q_rep_out_list")
    if candidates is None:
        raise BadField("q_rep_out_list", "is present but action_list is not (one row per candidate)")
    if array.ndim != 2 or array.shape[0] != len(candidates):
        raise BadField("q_rep_out_list", f"expected shape [{len(candidates)}, D] (one row per candidate), got {list(array.shape)}")
    if q_rep_out is not None and array.shape[1] != q_rep_out.shape[0]:
        raise BadField("q_rep_out_list", f"row width {array.shape[1]} differs from q_rep_out's {q_rep_out.shape[0]}")
    return array


# --------------------------------------------------------------------------- error messages


def trajectory_error(path: Path, t: int, raw: Any, bad: BadField) -> DigiqError:
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
    except BadField:
        return None
