"""`digiq evaluate`: every policy, π_β and uniform-random act live in MiniWoB++ on unseen seeds."""

from __future__ import annotations

from typing import Any

import typer

from digiq.cli.collect import EXECUTOR_HELP
from digiq.cli.common import Flag, comma_list, episodes, out, seed, stage_command, tasks, workers


def register(app: typer.Typer) -> None:
    stage_command(app, "evaluate", evaluate, Flag("--methods", "comma-separated methods", "evaluate.methods", convert=comma_list),
                  tasks("evaluate.tasks"), episodes("evaluate.episodes_per_task"), seed("evaluate.seed", "base seed of evaluation episodes"),
                  workers("evaluate.workers"), Flag("--executor", EXECUTOR_HELP, "evaluate.executor"), out("evaluate.out", "metrics JSON"),
                  Flag("--progress/--no-progress", "show a progress bar", type=bool, default=True))


def evaluate(params: Any, progress: bool) -> None:
    """Per protocol (sample, greedy): success rate (95 % Wilson CI), mean episode length, episodes and paired McNemar
    p-values, per method and task → metrics/eval.json."""
    from digiq.pipelines import evaluate as stage

    metrics = stage.run(params, progress=progress)
    _print(metrics)
    typer.echo(f"wrote {params.evaluate.out}, {params.evaluate.plots}")


def _print(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    for protocol, result in metrics["protocols"].items():
        bar = f", bar: {result['bar']}" if result.get("bar") else ""
        table = Table(title=f"online success, {protocol} protocol ({result['episodes_per_task']} episodes per task, "
                            f"seed {metrics['seed']}{bar})")
        for column in ("method", "success", "95 % CI", "mean steps", "episodes", f"p vs {result['paired']['reference']}"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for name, m in result["methods"].items():
            paired = result["paired"]["against"].get(name)
            table.add_row(name, f"{100 * m['success']:.1f} %", f"[{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]",
                          f"{m['mean_steps']:.2f}", str(m["episodes"]), "–" if paired is None else f"{paired['p']:.2g}")
        Console().print(table)
