"""One progress bar for every long loop: a rich bar on a terminal, nothing when disabled.

    with progress_bar("embed", total=n, unit="states") as bar:
        for chunk in chunks:
            ...
            bar.advance(len(chunk), rate=f"{done / elapsed:.0f} samples/s")

Extra keyword arguments of ``advance``/``update`` fill the bar's status text (``status="{steps} steps · {rate}"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Bar:
    """What a loop sees: ``advance`` and ``update``, no-ops when the bar is disabled."""

    def __init__(self, progress: Any = None, task: Any = None):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)

    def update(self, *, total: float | None = None, completed: float | None = None, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total, completed=completed, **fields)


@contextmanager
def progress_bar(description: str, total: float | None, *, enabled: bool = True, unit: str = "",
                 status: str = "", transient: bool = True, stderr: bool = False, **fields: Any) -> Iterator[Bar]:
    """A bar ``description ━━━ done/total unit status elapsed remaining``; ``status`` is a format string over
    ``fields`` (their initial values), refreshed by ``bar.advance(..., **fields)``."""
    if not enabled:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    if status:
        columns.append(TextColumn(status.replace("{", "{task.fields[").replace("}", "]}")))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    console = Console(stderr=True) if stderr else None
    with Progress(*columns, transient=transient, console=console) as progress:
        yield Bar(progress, progress.add_task(description, total=total, **fields))
