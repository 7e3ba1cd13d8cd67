"""Build the static viewer site for a dataset, and serve it with the standard library.

    OUT/
      index.html            the trajectory list (filters, sorting, pagination) — assets/index.js
      data/index.js         window.DIGIQ_INDEX = {columns of the index, one array per column}
      t/<traj>.html         one static page per trajectory
      img/ab/<sha256>.png   screenshots, hard-linked (copied across file systems) from the dataset
      assets/               viewer.css, index.js, trajectory.js (shipped in the package; no CDN)
      site.json             what the site was built from (marks the folder as a viewer site)

The whole folder is built next to OUT and swapped in at the end, so an interrupted build leaves the
previous site untouched. The same inputs give byte-identical files.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from digiq import __version__
from digiq.atomic import atomic_path
from digiq.errors import DigiqError
from digiq.schema import Trajectory
from digiq.store import Dataset
from digiq.viewer.render import Shot, StepView, TrajectoryView, esc, index_page, json_for_script, num, trajectory_page
from digiq.viewer.tables import Key, SideTables

SITE_FILE = "site.json"
GENERATOR = "digiq view"
ASSETS = ("viewer.css", "index.js", "trajectory.js")
INDEX_DIGITS = 6  # decimals kept for the index's numbers

Progress = Callable[[int, int], None]  # (trajectories done, total)


@dataclass
class SiteSummary:
    out: Path
    trajectories: int
    steps: int
    images: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.out / "index.html"


def build_site(
    dataset: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    critic: str | Path | None = None,
    policy: str | Path | None = None,
    top_k: int = 5,
    page_size: int = 50,
    progress: Progress | None = None,
) -> SiteSummary:
    """Write the viewer site for ``dataset`` into ``out`` (replaced as a whole) and return what was written."""
    started = time.perf_counter()
    ds = Dataset(dataset)
    side = SideTables.load(labels=labels, critic=critic, policy=policy, top_k=top_k)
    out = Path(out)
    check_out_folder(out, ds.root)
    ids = ds.trajectory_ids()
    files = page_files(ids)
    rows: list[dict[str, Any]] = []
    seen: set[Key] = set()
    with atomic_path(out) as tmp:
        for sub in ("t", "img", "data", "assets"):
            (tmp / sub).mkdir(parents=True)
        copy_assets(tmp / "assets")
        images = ImageLinker(ds, tmp / "img")
        title = ds.root.resolve().name
        for i, traj in enumerate(ds.iter_trajectories()):
            prev_href = files[i - 1] if i > 0 else None
            next_href = files[i + 1] if i + 1 < len(ids) else None
            view = trajectory_view(traj, side, images, title, prev_href, next_href)
            (tmp / "t" / files[i]).write_text(trajectory_page(view), encoding="utf-8")
            rows.append(index_row(traj, side, files[i]))
            seen.update((traj.traj_id, s.step_id) for s in traj.steps)
            if progress:
                progress(i + 1, len(ids))
        subtitle = f"{len(ids)} trajectories · {sum(r['len'] for r in rows)} steps · source: {ds.manifest.get('source', '?')}"
        (tmp / "index.html").write_text(index_page(title, subtitle, has_critic=side.scores is not None), encoding="utf-8")
        index = index_data(rows, has_critic=side.scores is not None, page_size=page_size)
        (tmp / "data" / "index.js").write_text(f"window.DIGIQ_INDEX={json_for_script(index)};\n", encoding="utf-8")
        warnings = coverage_warnings(side, seen)
        (tmp / SITE_FILE).write_text(json_for_script(site_manifest(ds, side, len(ids), len(seen), images.count, top_k)) + "\n", encoding="utf-8")
    return SiteSummary(out, len(ids), len(seen), images.count, time.perf_counter() - started, warnings)


def check_out_folder(out: Path, dataset_root: Path) -> None:
    """Refuse to replace a folder that is not a viewer site (the build swaps OUT as a whole)."""
    if out.resolve() == dataset_root.resolve() or dataset_root.resolve() in out.resolve().parents:
        raise DigiqError("the site cannot be written inside the dataset folder", file=out, field="--out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SITE_FILE).is_file())):
        raise DigiqError(f"exists and is not a viewer site (no {SITE_FILE}); refusing to replace it", file=out, field="--out")


def page_files(ids: list[str]) -> list[str]:
    """File names of the trajectory pages: the id where it is a safe name, else a slug plus a hash of the id."""
    names = []
    for traj_id in ids:
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", traj_id)[:80].lstrip(".") or "_"
        if slug != traj_id or slug.lower() in _RESERVED:
            slug = f"{slug}-{hashlib.sha1(traj_id.encode()).hexdigest()[:10]}"
        names.append(f"{slug}.html")
    lowered = [n.lower() for n in names]  # case-insensitive file systems
    if len(set(lowered)) != len(lowered):
        names = [f"{n[:-5]}-{hashlib.sha1(i.encode()).hexdigest()[:10]}.html" for n, i in zip(names, ids)]
    return names


_RESERVED = {"con", "prn", "aux", "nul", "index"}


def copy_assets(target: Path) -> None:
    package = resources.files("digiq.viewer") / "assets"
    for name in ASSETS:
        (target / name).write_bytes((package / name).read_bytes())


class ImageLinker:
    """Puts each screenshot once into the site (hard link, or copy across file systems) and knows its size."""

    def __init__(self, ds: Dataset, folder: Path):
        self.ds = ds
        self.folder = folder
        self.shots: dict[str, Shot] = {}

    @property
    def count(self) -> int:
        return len(self.shots)

    def shot(self, rel: str, sha256: str) -> Shot:
        if sha256 not in self.shots:
            source = self.ds.image_path(rel)
            name = f"{sha256[:2]}/{sha256}{source.suffix or '.png'}"
            target = self.folder / name
            target.parent.mkdir(exist_ok=True)
            link_or_copy(source, target)
            width, height = image_size(source)
            self.shots[sha256] = Shot(f"../img/{name}", width, height)
        return self.shots[sha256]


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise DigiqError("screenshot file is missing", file=source, field="screenshot") from None
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header (the pixels are not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DigiqError(f"not a readable image ({exc})", file=path, field="screenshot") from None


def trajectory_view(
    traj: Trajectory, side: SideTables, images: ImageLinker, dataset_name: str, prev_href: str | None, next_href: str | None
) -> TrajectoryView:
    steps = []
    for step in traj.steps:
        key = (traj.traj_id, step.step_id)
        steps.append(
            StepView(
                step=step,
                shot=images.shot(step.screenshot, step.screenshot_sha256),
                label=_get(side.labels, key),
                score=_get(side.scores, key),
                critic=_get(side.candidates, key),
                policy=_get(side.policy, key),
                contributions=_get(side.contributions.steps if side.contributions else None, key),
            )
        )
    facts = {}
    if side.scores is not None:
        facts["mean |TD error|"] = num(mean_abs_td(traj, side))
    if side.contributions is not None and side.contributions.note:
        facts["channel contributions"] = esc(side.contributions.note)
    if side.labels is not None:
        labelled = [s.label for s in steps if s.label]
        facts["ε-labels Yes"] = f"{sum(lab.label == 'Yes' for lab in labelled)} of {len(labelled)}"
    return TrajectoryView(
        trajectory=traj,
        steps=steps,
        prev_href=prev_href,
        next_href=next_href,
        has_critic=side.scores is not None,
        has_candidates=side.candidates is not None,
        has_policy=side.policy is not None,
        has_labels=side.labels is not None,
        channels=side.contributions.channels if side.contributions else (),
        dataset_name=dataset_name,
        facts=facts,
    )


def _get(table: dict[Key, Any] | None, key: Key) -> Any:
    return table.get(key) if table is not None else None


def mean_abs_td(traj: Trajectory, side: SideTables) -> float | None:
    """Critic error of a trajectory: mean over its scored steps of |TD error|."""
    errors = [abs(score.td_error) for s in traj.steps if (score := _get(side.scores, (traj.traj_id, s.step_id)))]
    return sum(errors) / len(errors) if errors else None


def index_row(traj: Trajectory, side: SideTables, file: str) -> dict[str, Any]:
    first = _get(side.scores, (traj.traj_id, 0))
    return {
        "id": traj.traj_id,
        "file": file,
        "task": traj.task,
        "len": len(traj.steps),
        "succ": int(traj.success),
        "rsum": traj.total_reward,
        "ret": traj.steps[0].mc_return,
        "v0": first.v if first else None,
        "tderr": mean_abs_td(traj, side),
    }


def index_data(rows: list[dict[str, Any]], *, has_critic: bool, page_size: int) -> dict[str, Any]:
    """Column arrays (compact, fast to parse); tasks are stored once and referenced by number."""
    tasks = sorted({r["task"] for r in rows})
    task_number = {t: i for i, t in enumerate(tasks)}
    ids = [r["id"] for r in rows]
    files = [r["file"] for r in rows]
    data: dict[str, Any] = {
        "version": 1,
        "page_size": page_size,
        "has_critic": has_critic,
        "tasks": tasks,
        "id": ids,
        "task": [task_number[r["task"]] for r in rows],
        "len": [r["len"] for r in rows],
        "succ": [r["succ"] for r in rows],
        "rsum": [_round(r["rsum"]) for r in rows],
        "ret": [_round(r["ret"]) for r in rows],
    }
    if files != [f"{i}.html" for i in ids]:
        data["file"] = files
    if has_critic:
        data["v0"] = [_round(r["v0"]) for r in rows]
        data["tderr"] = [_round(r["tderr"]) for r in rows]
    return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, INDEX_DIGITS) + 0.0


def coverage_warnings(side: SideTables, dataset_keys: set[Key]) -> list[str]:
    """Side-table rows that name steps the dataset does not have (a table made for another dataset?)."""
    warnings = []
    for name, keys in side.keyed().items():
        keys = set(keys)
        unmatched = len(keys - dataset_keys)
        if keys and unmatched == len(keys):
            warnings.append(f"{name}: none of its {len(keys)} steps is in this dataset (made for another dataset?)")
        elif unmatched:
            warnings.append(f"{name}: {unmatched} of {len(keys)} steps are not in this dataset")
    return warnings


def site_manifest(ds: Dataset, side: SideTables, n_traj: int, n_steps: int, n_images: int, top_k: int) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "version": __version__,
        "dataset": str(ds.root.resolve()),
        "side_tables": {name: str(path.resolve()) for name, path in (side.sources or {}).items()},
        "trajectories": n_traj,
        "steps": n_steps,
        "images": n_images,
        "top_k": top_k,
    }


# ------------------------------------------------------------------------------------------ serving


def make_server(site: str | Path, port: int = 8000, host: str = "127.0.0.1"):  # -> http.server.ThreadingHTTPServer
    """An HTTP server for a built site on ``host:port`` (port 0: any free port); call serve_forever()."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    site = Path(site)
    if not (site / SITE_FILE).is_file():
        raise DigiqError(f"not a viewer site (no {SITE_FILE}); build it first", file=site)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
            pass

    try:
        return ThreadingHTTPServer((host, port), functools.partial(Quiet, directory=str(site)))
    except OSError as exc:
        raise DigiqError(f"cannot listen on {host}:{port} ({exc.strerror})", field="view.port") from None
