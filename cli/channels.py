"""`digiq channels`: the critic's extra input channels (image, goal, previous action, action) for every state."""

from __future__ import annotations

from typing import Any

import typer

from digiq.cli.common import device, out, stage_command


def register(app: typer.Typer) -> None:
    stage_command(app, "channels", channels, out("channels.out", "channel tables folder (states.parquet, candidates.parquet)"),
                  device("channels.device"))


def channels(params: Any) -> None:
    """Encode every screenshot with the frozen vision tower and every goal and action with all-MiniLM-L6-v2."""
    from digiq.pipelines import channels as stage

    m = stage.run(params, progress=True)
    dims = ", ".join(f"{name} {d}" for name, d in m["dims"].items())
    typer.echo(f"wrote {params.channels.out} ({m['states']} states, {m['candidates']} candidates; {dims}) and "
               f"{params.channels.metrics} in {m['seconds']['total']:.1f} s")
