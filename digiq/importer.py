"""Import the official Digi-Q / DigiRL trajectory files into a digiq dataset.

    report = import_official("trajectories.pt", images="screenshots/", out="data/official")

The official file is a ``torch.save``-d list of trajectories, each a list of step dicts. It is loaded without
executing code from it (:mod:`digiq.official_load`), each trajectory is checked and converted
(:mod:`digiq.official_steps`, which lists the step fields), and the output, written atomically, is a normal
dataset (steps/*.parquet, screenshots/ by content hash, manifest.json) plus the file's candidates,
precomputed arrays and source columns (:mod:`digiq.official_writer`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from digiq.atomic import atomic_path
from digiq.errors import DigiqError
from digiq.official_load import load_official
from digiq.official_steps import BadField, ImageIndex, convert_trajectory, trajectory_error
from digiq.official_writer import CANDIDATES_FILE, PRECOMPUTED_FILE, DatasetBuilder, array_widths


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
        builder = DatasetBuilder(root, meta, gamma=options.gamma, shard_steps=options.shard_steps,
                                 flush_bytes=options.flush_bytes)
        try:
            for t, raw in enumerate(data):
                try:
                    builder.add(convert_trajectory(raw, t, index))
                except BadField as bad:
                    error = trajectory_error(path, t, raw, bad)
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
            candidate_rows=builder.rows(CANDIDATES_FILE),
            precomputed_rows=builder.rows(PRECOMPUTED_FILE),
            images=len(builder.images),
            layout=array_widths(builder.layout),
            mc_return_max_abs_diff=builder.max_return_diff,
            seconds=0.0,
            load_seconds=load_seconds,
        )
    report.seconds = time.perf_counter() - start
    return report


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
