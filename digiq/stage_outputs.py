"""What the training stages write besides their models: DVCLive curves and JSON-safe metrics.

    with live_curves("dvclive/critic", CURVES, open_live) as log_fn:   # log_fn(point, step), or None without a folder
        train(..., log_fn)

The library never imports DVCLive: the stage passes ``open_live`` (a folder → a ``dvclive.Live``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from digiq.atomic import atomic_path


@contextlib.contextmanager
def live_curves(directory: str | Path | None, curves: tuple[str, ...],
                open_live: Callable[[str], Any]) -> Iterator[Callable[[dict[str, float], int], None] | None]:
    """A ``log_fn(point, step)`` writing DVCLive step metrics into ``directory`` (atomically replaced at the end).

    ``train/<name>`` for training-window means, ``val/<name>`` for held-out losses (names starting ``val_``); the x
    axis is the update count. None: no logger."""
    if directory is None:
        yield None
        return
    with atomic_path(directory) as tmp:
        live = open_live(str(tmp))

        def log(point: dict[str, float], step: int) -> None:
            live.step = step
            for name in curves:
                if name in point and math.isfinite(point[name]):
                    group = "val" if name.startswith("val_") else "train"
                    live.log_metric(f"{group}/{name.removeprefix('val_')}", point[name])

        yield log
        live.end()


def finite_or_none(value: Any) -> Any:
    """NaN/inf → None (JSON has no NaN; DVC metrics readers reject it), recursively."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
