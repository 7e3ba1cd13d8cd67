"""`digiq doctor`: check the machine and the project (torch, chromium, disk, params, Feast, DVC) and say what to do."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION

STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


def doctor(
    browser: bool = typer.Option(True, "--browser/--no-browser", help="start headless Chromium on a MiniWoB task (~5 s)"),
    as_json: bool = typer.Option(False, "--json", help="print the findings as JSON"),
    root: Path = typer.Option(Path("."), "--root", help="the project folder (dvc.yaml, features/)"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Check torch, chromium + chromedriver (and a headless start), disk space, params validity, the Feast
    registry and DVC status; print what to do for each problem. Exit 1 when a check fails."""
    from rich.console import Console
    from rich.table import Table

    from digiq import doctor as D

    findings = D.run_checks(root.resolve(), params, browser=browser)
    if as_json:
        typer.echo(D.as_json(findings))
    else:
        table = Table("check", "status", "found", "what to do")
        for f in findings:
            table.add_row(f.name, f"[{STYLE[f.status]}]{f.status}[/]", f.detail, f.fix)
        Console().print(table)
    if any(f.status == "fail" for f in findings):
        raise typer.Exit(1)
