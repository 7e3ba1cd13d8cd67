"""`digiq evaluate`: every policy, π_β and uniform-random act live in MiniWoB++ on unseen seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, comma_list, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


@handle_errors
def evaluate(
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
    methods: str | None = typer.Option(None, "--methods", help="comma-separated methods"),
    tasks: str | None = typer.Option(None, "--tasks", help="comma-separated MiniWoB tasks"),
    episodes: int | None = typer.Option(None, "--episodes", help="episodes per (method, task)"),
    seed: int | None = typer.Option(None, "--seed", help="base seed of evaluation episodes"),
    workers: int | None = typer.Option(None, "--workers", help="parallel browsers"),
    out: Path | None = typer.Option(None, "--out", help="metrics JSON"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
) -> None:
    """Success rate (95 % Wilson CI), mean episode length and episodes, per method and task → metrics/eval.json."""
    from digiq.pipelines import evaluate as stage

    settings = load(params, overrides, {"evaluate.methods": comma_list(methods), "evaluate.tasks": comma_list(tasks),
                                        "evaluate.episodes_per_task": episodes, "evaluate.seed": seed,
                                        "evaluate.workers": workers, "evaluate.out": out})
    metrics = stage.run(settings, progress=progress)
    _print(metrics)
    typer.echo(f"wrote {settings.evaluate.out}, {settings.evaluate.plots}")


def _print(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"online success ({metrics['episodes_per_task']} episodes per task, seed {metrics['seed']})")
    for column in ("method", "success", "95 % CI", "mean steps", "episodes"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, m in metrics["methods"].items():
        table.add_row(name, f"{100 * m['success']:.1f} %", f"[{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]",
                      f"{m['mean_steps']:.2f}", str(m["episodes"]))
    Console().print(table)
