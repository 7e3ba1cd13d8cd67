"""`digiq evaluate`: every policy, π_β and uniform-random act live in MiniWoB++ on unseen seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@handle_errors
def evaluate(
    methods: str | None = typer.Option(None, "--methods", help="comma-separated methods [params: evaluate.methods]"),
    tasks: str | None = typer.Option(None, "--tasks", help="comma-separated MiniWoB tasks [params: evaluate.tasks or collect.tasks]"),
    episodes: int | None = typer.Option(None, "--episodes", help="episodes per (method, task) [params: evaluate.episodes_per_task]"),
    seed: int | None = typer.Option(None, "--seed", help="base seed of evaluation episodes [params: evaluate.seed]"),
    k: int | None = typer.Option(None, "--k", help="π_β candidates per live step [params: evaluate.k]"),
    workers: int | None = typer.Option(None, "--workers", help="parallel browsers [params: evaluate.workers]"),
    time_limit: float | None = typer.Option(None, "--time-limit", help="MiniWoB episode clock, seconds [params: evaluate.time_limit_s]"),
    shards: str | None = typer.Option(None, "--shards", help="result shard folder (resume) [params: evaluate.shards]"),
    out: str | None = typer.Option(None, "--out", help="metrics JSON [params: evaluate.out]"),
    plots: str | None = typer.Option(None, "--plots", help="plot CSV [params: evaluate.plots]"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Success rate (95 % Wilson CI), mean episode length and episodes, per method and task → metrics/eval.json."""
    from digiq.pipelines import evaluate as stage

    config = stage.EvaluateConfig.from_params(
        load(params), methods=_split(methods), tasks=_split(tasks), episodes=episodes, seed=seed, k=k, workers=workers,
        time_limit_s=time_limit, shards=shards, out=out, plots=plots)
    metrics = stage.run(config, progress=progress)
    _print(metrics)
    typer.echo(f"wrote {config.out}, {config.plots}")


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
