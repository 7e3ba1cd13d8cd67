"""The feature store's write path: checked inputs → derived sources → `feast apply` → materialize.

    materialize(FeatureInputs.from_params(params))   # the features stage; returns its metrics

The derived sources go to ``data/features/<variant>/`` (deterministic Parquet: a DVC output, what training sets read).
The registry and online store are built in a temporary folder and moved into the repository's ``data/<variant>/``
only when everything succeeded, so a failed run leaves the last good store. Next to them: ``sources.json`` (the
source paths applied, read by the definitions module, so that ``feast apply`` run by hand in the repository folder
registers exactly these) and a rendered ``feature_store.yaml`` (for ``feast -f``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from digiq import feature_contract as fc
from digiq import store_client as client
from digiq.atomic import atomic_path, write_json, write_text
from digiq.feature_sources import FeatureInputs, check_and_derive, summary, timestamp_range


def materialize(inputs: FeatureInputs, *, progress: bool = False) -> dict[str, Any]:
    """Check the inputs, write the derived sources, apply the definitions and materialize the online views; the
    metrics (rows served, vector sizes, timings)."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    client.check_repo(inputs.repo)  # before anything is written under it
    dims, derived = check_and_derive(inputs)
    timings["check_and_derive_s"] = time.perf_counter() - start
    write_derived(inputs.derived, derived)
    paths = inputs.source_paths()
    write_runtime_config(inputs, paths)
    timings.update(build_store(inputs, paths, progress=progress))
    timings["total_s"] = time.perf_counter() - start
    return {**summary(inputs, dims, derived), "timings_s": {k.removesuffix("_s"): round(v, 3) for k, v in timings.items()}}


def write_derived(folder: Path, derived: dict[str, pa.Table]) -> None:
    """The derived tables as one folder of Parquet files, replaced as a whole."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, table in derived.items():
            pq.write_table(table, tmp / f"{name}.parquet")


def write_runtime_config(inputs: FeatureInputs, paths: dict[str, str]) -> None:
    """sources.json (read by the definitions module) and a rendered feature_store.yaml in the variant's run-time folder."""
    import yaml

    state_dir = fc.runtime_dir(inputs.repo, inputs.variant)
    write_json(state_dir / "sources.json", paths)
    relative = Path("data") / inputs.variant
    config = client.render_config(inputs.repo, relative / "registry.db", relative / "online_store.db", inputs.online_store)
    header = "# Rendered by `digiq features materialize`: use with `feast -f <this file> ...` inside the repository folder.\n"
    write_text(state_dir / client.STORE_CONFIG, header + yaml.safe_dump(config, sort_keys=False))


def build_store(inputs: FeatureInputs, paths: dict[str, str], *, progress: bool) -> dict[str, float]:
    """`feast apply` + materialize into a temporary registry/online store, then swap them in; the timings."""
    state_dir = fc.runtime_dir(inputs.repo, inputs.variant)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=state_dir))
    try:
        store, objects, timings = client.apply_definitions(inputs.repo, paths, build, inputs.online_store)
        online = [view.name for view in fc.served_views(paths) if objects[view.name].online]  # candidate_embedding is offline only
        timings.update(_materialize_views(store, online, timestamp_range(list(paths.values())), progress=progress))
        for name in ("online_store.db", "registry.db") if client.is_sqlite(inputs.online_store) else ("registry.db",):
            os.replace(build / name, state_dir / name)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return timings


def _materialize_views(store: Any, views: list[str], window: tuple[Any, Any], *, progress: bool) -> dict[str, float]:
    from digiq.progress import progress_bar

    timings: dict[str, float] = {}
    with progress_bar("materialize", total=len(views), enabled=progress, unit="views", status="{view}", view="",
                      transient=False) as bar:
        for view in views:
            bar.update(view=view)
            t = time.perf_counter()
            with client.quiet_feast():
                store.materialize(window[0], window[1], feature_views=[view])
            timings[f"materialize_{view}_s"] = time.perf_counter() - t
            bar.advance()
    return timings
