"""`digiq report`: reports/report.md and a self-contained reports/report.html from the stage outputs."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("report")(report)


@handle_errors
def report(params: Path = PARAMS_OPTION, overrides: list[str] | None = SET_OPTION) -> None:
    """Main table beside the paper's numbers, per-task and ablation tables, label balance, critic diagnostics,
    data checks, params and data hashes."""
    from digiq.pipelines import report as stage

    md, page = stage.run(load(params, overrides), progress=True, params_path=params)
    typer.echo(f"wrote {md}, {page}")
