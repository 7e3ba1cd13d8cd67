"""ε-labels of visual change (Digi-Q's representation fine-tuning, arXiv 2502.15760): did the action change the screen?

For a transition (s, a, s') both screenshots are downscaled by ``scale`` (official 0.25), then

    mse(s, s') = mean over pixels p and RGB channels c of (s_pc − s'_pc)²      (0–255 pixel values)
    label      = "Yes" if mse > ε else "No"                                   (official ε = 30)

Only non-terminal transitions with a real next frame are labelled: MiniWoB returns an all-black frame on
termination (:mod:`digiq.envs.miniwob`), so a terminal transition's MSE says "the episode ended", not "the action
changed the screen". Terminal steps and steps whose ``next_screenshot`` is None are excluded and counted.

Downscaling uses PIL's BOX filter: each output pixel is the exact area mean of the input pixels it covers.
Every input pixel contributes once (nearest would drop or keep a 1-px caret or a thin border by chance),
and there is no ringing/overshoot on sharp UI edges (bicubic/lanczos, PIL's ``resize`` default being
bicubic), so the MSE is the change of local mean colour; it is also the cheapest filter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from digiq.atomic import atomic_path
from digiq.checks import Expect, SuiteResult, run_suite
from digiq.errors import DigiqError
from digiq.progress import progress_bar
from digiq.store import Dataset

if TYPE_CHECKING:
    from digiq.config import LabelParams

YES, NO = "Yes", "No"
KIND_ORDER = ("tap", "swipe", "type", "press_enter", "press_back", "press_home", "complete")
LABEL_SCHEMA = pa.schema(
    [
        ("traj_id", pa.string()),
        ("step_id", pa.int32()),
        ("action_kind", pa.string()),  # tap / swipe / type / press_enter / … (schema.Action.kind)
        ("mse", pa.float64()),  # mean squared RGB difference of the downscaled screenshots, 0–255 scale
        ("label", pa.string()),  # "Yes" when mse > epsilon, else "No"
        ("epsilon", pa.float64()),
        ("scale", pa.float64()),
    ]
)
LABEL_COLUMNS = tuple(LABEL_SCHEMA.names)
Resample = Literal["box", "bilinear", "bicubic", "lanczos", "nearest"]
RESAMPLE_FILTERS = ("box", "bilinear", "bicubic", "lanczos", "nearest")
_CHUNK = 256  # transitions per vectorised MSE batch
_CACHE_FRAMES = 512  # downscaled frames kept (consecutive steps share a screenshot)
_BATCH_VALUES = 1 << 22  # pixel values per vectorised MSE call (~4 M: tens of MB of temporaries)


# --- the equation ---------------------------------------------------------------------------------------


def downscaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Target (width, height): each side times ``scale``, rounded, at least 1 pixel."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def downscale(image: Any, scale: float, resample: Resample = "box") -> np.ndarray:
    """An RGB PIL image downscaled by ``scale`` as an HxWx3 uint8 array (scale 1 keeps it as is)."""
    from PIL import Image

    image = image.convert("RGB")
    size = downscaled_size(image.width, image.height, scale)
    if size != image.size:
        image = image.resize(size, resample=getattr(Image.Resampling, resample.upper()))
    return np.asarray(image, dtype=np.uint8)


def pixel_mse(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Mean squared difference over pixels and channels; batched: inputs [..., H, W, 3] uint8 → output [...].

    Exact: differences fit int16, their squares (≤ 255²) int32, and the sum is taken in int64, so the
    only rounding is the final division.
    """
    diff = before.astype(np.int16) - after.astype(np.int16)
    squared = np.square(diff, dtype=np.int32)
    return squared.sum(axis=(-3, -2, -1), dtype=np.int64) / np.prod(diff.shape[-3:])


def threshold(mse: np.ndarray, epsilon: float) -> np.ndarray:
    """ "Yes" where mse > ε (strictly), else "No"."""
    return np.where(np.asarray(mse) > epsilon, YES, NO)


# --- transitions of a dataset ---------------------------------------------------------------------------


@dataclass
class Transitions:
    """The labellable steps of a dataset (a pandas DataFrame) and how many steps were left out, and why."""

    frame: Any  # pandas.DataFrame: traj_id, step_id, action_kind, screenshot(+_sha256), next_screenshot(+_sha256)
    total_steps: int
    excluded: dict[str, int] = field(default_factory=dict)  # "terminal", "no_next_screenshot"


def select_transitions(dataset: Dataset) -> Transitions:
    """Non-terminal steps that have a next screenshot, ordered by (traj_id, step_id)."""
    steps = dataset.steps_df()
    terminal = steps["done"].astype(bool)
    no_next = ~terminal & steps["next_screenshot"].isna()
    keep = steps[~terminal & ~no_next]
    columns = ["traj_id", "step_id", "action_kind", "screenshot", "screenshot_sha256", "next_screenshot", "next_screenshot_sha256"]
    return Transitions(
        frame=keep[columns].reset_index(drop=True),
        total_steps=len(steps),
        excluded={"terminal": int(terminal.sum()), "no_next_screenshot": int(no_next.sum())},
    )


class _Frames:
    """Decode and downscale each screenshot once (keyed by sha256), keeping the most recent ones.

    PNG decoding dominates the cost (per MiniWoB screen: docs/benchmarks.md; phone screens cost far more);
    PIL releases the GIL while decoding, so missing frames are decoded on a small thread pool.
    """

    def __init__(self, dataset: Dataset, scale: float, resample: Resample, workers: int, capacity: int = _CACHE_FRAMES):
        self.dataset, self.scale, self.resample, self.capacity = dataset, scale, resample, capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        self.decoded = 0

    def _decode(self, ref: tuple[str, str]) -> np.ndarray:
        rel, sha256 = ref
        return downscale(self.dataset.load_image(rel, sha256), self.scale, self.resample)

    def load(self, refs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
        """Downscaled frames for (relative path, sha256) references, by sha256."""
        missing = list({sha: (rel, sha) for rel, sha in refs if sha not in self._cache}.values())
        decoded = list(self._pool.map(self._decode, missing) if self._pool else map(self._decode, missing))
        self.decoded += len(decoded)
        frames = {sha: self._cache[sha] for _, sha in refs if sha in self._cache}
        frames.update((sha, frame) for (_, sha), frame in zip(missing, decoded))
        for sha in frames:  # most recent last; evict the oldest beyond capacity
            self._cache[sha] = frames[sha]
            self._cache.move_to_end(sha)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return frames

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def transition_mse(
    dataset: Dataset, transitions: Any, scale: float, resample: Resample = "box", progress: bool = False, workers: int = 2
) -> tuple[np.ndarray, int]:
    """MSE of every transition (rows of ``transitions``), in batches; returns (mse, screenshots decoded)."""
    _check_scale(scale)
    if resample not in RESAMPLE_FILTERS:
        raise DigiqError(f"unknown resampling filter {resample!r}; one of {', '.join(RESAMPLE_FILTERS)}", field="resample")
    frames = _Frames(dataset, scale, resample, workers)
    rows = transitions[["traj_id", "step_id", "screenshot", "screenshot_sha256", "next_screenshot", "next_screenshot_sha256"]].itertuples(index=False)
    mse = np.empty(len(transitions), dtype=np.float64)
    try:
        with progress_bar("ε-labels: screenshot MSE", len(transitions), enabled=progress, unit="transitions") as bar:
            for start, chunk in _chunks(rows, _CHUNK):
                loaded = frames.load([ref for r in chunk for ref in ((r.screenshot, r.screenshot_sha256), (r.next_screenshot, r.next_screenshot_sha256))])
                pairs = [(loaded[r.screenshot_sha256], loaded[r.next_screenshot_sha256]) for r in chunk]
                mse[start : start + len(chunk)] = _batch_mse(dataset, chunk, pairs)
                bar.advance(len(chunk))
    finally:
        frames.close()
    return mse, frames.decoded


def _batch_mse(dataset: Dataset, chunk: list[Any], pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Stack same-sized pairs and compute their MSEs in one vectorised call (sizes may differ across pairs)."""
    for row, (before, after) in zip(chunk, pairs):
        if before.shape != after.shape:
            raise DigiqError(
                f"screenshot is {before.shape[1]}x{before.shape[0]} but next_screenshot is {after.shape[1]}x{after.shape[0]} "
                f"after downscaling (traj {row.traj_id!r} step {row.step_id}); the MSE needs equal sizes",
                file=dataset.image_path(row.next_screenshot),
                field="next_screenshot",
            )
    out = np.empty(len(pairs), dtype=np.float64)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (before, _) in enumerate(pairs):
        by_shape.setdefault(before.shape, []).append(i)
    for shape, indices in by_shape.items():
        step = max(1, _BATCH_VALUES // int(np.prod(shape)))  # bound memory for large (phone) screenshots
        for batch in (indices[i : i + step] for i in range(0, len(indices), step)):
            before = np.stack([pairs[i][0] for i in batch])
            after = np.stack([pairs[i][1] for i in batch])
            out[batch] = pixel_mse(before, after)
    return out


# --- the label table ------------------------------------------------------------------------------------


@dataclass
class LabelRun:
    """Labels plus the bookkeeping a stage reports."""

    table: Any  # pandas.DataFrame with LABEL_COLUMNS
    total_steps: int
    excluded: dict[str, int]
    decoded: int  # screenshots decoded (each distinct frame once while cached)


def compute_mse(dataset: Dataset, scale: float, resample: Resample = "box", progress: bool = False, workers: int = 2) -> LabelRun:
    """MSE of every labellable transition (label/epsilon columns not yet filled: see ``label_table``)."""
    import pandas as pd

    transitions = select_transitions(dataset)
    mse, decoded = transition_mse(dataset, transitions.frame, scale, resample, progress, workers)
    table = pd.DataFrame(
        {
            "traj_id": transitions.frame["traj_id"].astype(str),
            "step_id": transitions.frame["step_id"].astype(np.int32),
            "action_kind": transitions.frame["action_kind"].astype(str),
            "mse": mse,
        }
    )
    table["scale"] = float(scale)
    return LabelRun(table=table, total_steps=transitions.total_steps, excluded=transitions.excluded, decoded=decoded)


def label_table(mse_table: Any, epsilon: float) -> Any:
    """The label table (LABEL_COLUMNS) for one ε, from a table with traj_id, step_id, action_kind, mse, scale."""
    _check_epsilon(epsilon)
    table = mse_table.copy()
    table["label"] = threshold(table["mse"].to_numpy(), epsilon)
    table["epsilon"] = float(epsilon)
    return table[list(LABEL_COLUMNS)]


def make_labels(
    dataset: Dataset, epsilon: float, scale: float, resample: Resample = "box", progress: bool = False, workers: int = 2
) -> LabelRun:
    """ε-labels of a dataset: compute_mse then threshold."""
    run = compute_mse(dataset, scale, resample, progress, workers)
    run.table = label_table(run.table, epsilon)
    return run


def write_labels(table: Any, path: str | Path) -> None:
    """Write the label table as Parquet (LABEL_SCHEMA), atomically."""
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table[list(LABEL_COLUMNS)], schema=LABEL_SCHEMA, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)


def read_labels(path: str | Path) -> Any:
    """Read a label table (a pandas DataFrame), checking its columns."""
    from digiq.parquet import read_table

    table = read_table(path)
    missing = [c for c in LABEL_COLUMNS if c not in table.column_names]
    if missing:
        raise DigiqError(f"missing column(s) {', '.join(missing)}", file=path, field=missing[0])
    return table.select(list(LABEL_COLUMNS)).to_pandas()


# --- balance: summaries, the gate, the sweep ------------------------------------------------------------


def ordered_kinds(kinds: Iterable[str]) -> list[str]:
    """Action kinds in the canonical order (unknown kinds last, alphabetically)."""
    present = set(kinds)
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def balance(table: Any) -> dict[str, Any]:
    """Counts and Yes fractions overall and per action kind."""
    yes = table["label"] == YES
    per_kind = {}
    for kind in ordered_kinds(table["action_kind"]):
        mask = table["action_kind"] == kind
        per_kind[kind] = {"n": int(mask.sum()), "yes": int(yes[mask].sum()), "yes_fraction": _fraction(yes[mask])}
    return {"n": len(table), "yes": int(yes.sum()), "yes_fraction": _fraction(yes), "per_kind": per_kind}


def mse_quantiles(mse: Sequence[float] | np.ndarray, qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[str, float]:
    """Quantiles of the MSE (p10 … p90, max); empty when there are no transitions."""
    values = np.asarray(mse, dtype=np.float64)
    if values.size == 0:
        return {}
    out = {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in qs}
    out["max"] = float(values.max())
    return out


def label_expectations(table: Any, rule: LabelParams) -> tuple[list[Expect], list[str]]:
    """The label suite: table integrity, then Yes fraction overall and per gated action kind.

    Returns the expectations and the kinds left ungated (fewer than ``rule.min_count`` transitions).
    The Yes fraction is the mean of the 0/1 column ``is_yes`` that ``check_labels`` adds.
    """
    lo, hi = rule.yes_band
    expectations = [
        Expect("ExpectTableRowCountToBeBetween", {"min_value": 1}, "at least one labelled transition"),
        Expect("ExpectColumnValuesToBeInSet", {"column": "label", "value_set": [YES, NO]}, "labels are Yes/No"),
        Expect("ExpectColumnValuesToBeBetween", {"column": "mse", "min_value": 0}, "MSE is a non-negative number"),
        Expect("ExpectColumnValuesToNotBeNull", {"column": "mse"}, "MSE is present"),
        Expect("ExpectCompoundColumnsToBeUnique", {"column_list": ["traj_id", "step_id"]}, "one label per (traj_id, step_id)"),
        Expect("ExpectColumnMeanToBeBetween", {"column": "is_yes", "min_value": lo, "max_value": hi}, f"Yes fraction overall in [{lo}, {hi}]"),
    ]
    ungated = []
    for kind, n in table["action_kind"].value_counts().items():
        if n < rule.min_count:
            ungated.append(kind)
    for kind in ordered_kinds(table["action_kind"]):
        if kind in ungated:
            continue
        klo, khi = rule.band(kind)
        expectations.append(
            Expect(
                "ExpectColumnMeanToBeBetween",
                {"column": "is_yes", "min_value": klo, "max_value": khi, "row_condition": f'action_kind=="{kind}"', "condition_parser": "pandas"},
                f"Yes fraction of {kind} in [{klo}, {khi}]",
            )
        )
    return expectations, ordered_kinds(ungated)


def check_labels(table: Any, rule: LabelParams, docs_dir: Path | None = None) -> tuple[SuiteResult, list[str]]:
    """Run the label-balance gate; returns the result and the ungated kinds (the caller decides to raise)."""
    expectations, ungated = label_expectations(table, rule)
    frame = table.assign(is_yes=(table["label"] == YES).astype(np.float64))
    return run_suite("label_balance", frame, expectations, docs_dir=docs_dir), ungated


def sweep(mse_table: Any, epsilons: Sequence[float]) -> Any:
    """Yes fraction against ε, overall and per action kind: one row per ε (wide, as DVC plots read it)."""
    import pandas as pd

    for eps in epsilons:
        _check_epsilon(eps)
    kinds = ordered_kinds(mse_table["action_kind"])
    mse = mse_table["mse"].to_numpy()
    rows = []
    for eps in sorted(set(float(e) for e in epsilons)):
        yes = mse > eps
        row = {"epsilon": eps, "overall": _fraction(yes)}
        for kind in kinds:
            row[kind] = _fraction(yes[(mse_table["action_kind"] == kind).to_numpy()])
        rows.append(row)
    return pd.DataFrame(rows, columns=["epsilon", "overall", *kinds])


# --- helpers ---------------------------------------------------------------------------------------------


def _fraction(mask: Any) -> float | None:
    mask = np.asarray(mask, dtype=bool)
    return float(mask.mean()) if mask.size else None


def _check_scale(scale: float) -> None:
    if not 0.0 < scale <= 1.0:
        raise DigiqError(f"scale must be in (0, 1], got {scale}", field="scale")


def _check_epsilon(epsilon: float, field_name: str = "epsilon") -> None:
    if not (np.isfinite(epsilon) and epsilon >= 0):
        raise DigiqError(f"ε must be a finite number >= 0, got {epsilon}", field=field_name)


def _chunks(rows: Iterable[Any], size: int) -> Iterable[tuple[int, list[Any]]]:
    chunk, start = [], 0
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield start, chunk
            start, chunk = start + size, []
    if chunk:
        yield start, chunk
