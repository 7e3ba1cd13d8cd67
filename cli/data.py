"""`digiq data stats|show` and `digiq import-digiq`.

Only typer and the stdlib at module top: rich, torch and the library load inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick

app = typer.Typer(no_args_is_help=True)

DATASET_ARGUMENT = typer.Argument(..., help="Dataset folder (manifest.json, steps/, screenshots/).", show_default=False)


@app.command("stats")
@handle_errors
def stats(
    dataset: Path = DATASET_ARGUMENT,
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON instead of tables."),
) -> None:
    """Trajectories, steps, success rate, mean length and action-type histogram, overall and per task."""
    from digiq.datasets import dataset_stats
    from digiq.store import Dataset

    summary = dataset_stats(Dataset(dataset))
    if as_json:
        typer.echo(json.dumps(summary.model_dump(), indent=2))
        return
    _print_stats(summary)


@app.command("show")
@handle_errors
def show(
    dataset: Path = DATASET_ARGUMENT,
    traj: str = typer.Option(..., "--traj", help="Trajectory id (see `digiq data stats` or the steps table).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the trajectory as JSON instead of a table."),
) -> None:
    """One trajectory step by step: action (string and plain words), reward, done, return, screenshots."""
    from digiq.datasets import trajectory_view
    from digiq.store import Dataset

    view = trajectory_view(Dataset(dataset), traj)
    if as_json:
        typer.echo(json.dumps(view.model_dump(), indent=2))
        return
    _print_trajectory(view)


@handle_errors
def import_digiq(
    file: Path = typer.Argument(..., help="Official Digi-Q / DigiRL trajectory file (.pt).", show_default=False),
    images: Path = typer.Option(
        ..., "--images", help="Folder holding the screenshots; the file's absolute image paths are matched by file name.", show_default=False
    ),
    out: Path = typer.Option(None, "--out", help="Dataset folder to write [default: params.yaml collect.out]."),
    gamma: float = typer.Option(None, "--gamma", min=0.0, max=1.0, help="Discount γ for the stored mc_return [default: params.yaml gamma]."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad trajectories (and report how many) instead of stopping at the first."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT when it exists and is not empty."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Import an official Digi-Q / DigiRL .pt file (safely: no code from the file runs) as a digiq dataset.

    Writes the step table and screenshots, plus candidates.parquet (action_list), precomputed.parquet
    (image_features, q_rep_out) and official.parquet (source fields) when the file has them.
    The output appears only when the whole import succeeded.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from digiq.importer import ImportOptions, import_official

    settings = load(params)
    options = ImportOptions(gamma=pick(gamma, settings.gamma), skip_bad=skip_bad, overwrite=overwrite)
    target = Path(pick(out, settings.collect.out))
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"loading {file.name}", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, description="importing trajectories", completed=done, total=total)

        report = import_official(file, images, target, options, progress=advance)
    for message in report.skipped:
        typer.secho(f"skipped: {message}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"imported {report.trajectories} trajectories, {report.steps} steps, {report.images} screenshots "
        f"into {report.out} in {report.seconds:.1f} s; skipped {len(report.skipped)} bad trajectories"
    )
    if report.candidate_rows or report.precomputed_rows:
        typer.echo(f"candidates: {report.candidate_rows} rows; precomputed arrays: {report.precomputed_rows} rows {report.layout}")
    if report.mc_return_max_abs_diff is not None and report.mc_return_max_abs_diff > 1e-6:
        typer.secho(
            f"note: the file's mc_return differs from returns at γ={options.gamma} by up to {report.mc_return_max_abs_diff:.4g} "
            "(made with another γ?); the file's values are kept in official.parquet",
            fg=typer.colors.YELLOW,
            err=True,
        )


def register(root: typer.Typer) -> None:
    """Top-level commands that belong with the data utilities."""
    root.command("import-digiq")(import_digiq)


def _print_stats(summary) -> None:  # DatasetStats
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{escape(summary.path)}[/bold]  source={escape(str(summary.source))}  γ={summary.gamma}\n"
        f"trajectories {summary.trajectories}   steps {summary.steps}   "
        f"success rate {_percent(summary.success_rate)}   mean length {_number(summary.mean_length)}"
    )
    kinds = Table(title="actions by kind")
    kinds.add_column("kind")
    kinds.add_column("steps", justify="right")
    kinds.add_column("share", justify="right")
    for kind, n in summary.action_kinds.items():
        kinds.add_row(kind, str(n), _percent(n / summary.steps))
    console.print(kinds)
    per_task = Table(title="per task")
    for name in ("task", "trajectories", "steps", "success", "mean length", "actions"):
        per_task.add_column(name, justify="left" if name in ("task", "actions") else "right")
    for task in summary.tasks:
        actions = ", ".join(f"{kind} {n}" for kind, n in task.action_kinds.items())
        per_task.add_row(escape(task.task), str(task.trajectories), str(task.steps), _percent(task.success_rate), _number(task.mean_length), actions)
    console.print(per_task)
    if summary.tables:
        console.print("tables: " + ", ".join(f"{name} ({rows} rows)" for name, rows in summary.tables.items()))


def _print_trajectory(view) -> None:  # TrajectoryView
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]trajectory {escape(view.traj_id)}[/bold]  task: {escape(view.task)}\n"
        f"goal: {escape(view.goal)}\n{len(view.steps)} steps, total reward {view.total_reward:g}, "
        f"{'success' if view.success else 'failure'}"
    )
    table = Table(show_lines=True)
    with_candidates = any(step.candidates is not None for step in view.steps)
    for name in ("step", "action", "reward", "done", "return", "screenshot"):
        table.add_column(name, justify="right" if name in ("step", "reward", "return") else "left", overflow="fold")
    if with_candidates:
        table.add_column("cands", justify="right")
    for step in view.steps:
        shots = escape(step.screenshot + (f"\n→ {step.next_screenshot}" if step.next_screenshot else ""))
        row = [str(step.step_id), f"{escape(step.description)}\n[dim]{escape(step.action)}[/dim]", f"{step.reward:g}", "yes" if step.done else "no", f"{step.mc_return:.4f}", shots]
        table.add_row(*row, *([str(step.candidates)] if with_candidates else []))
    console.print(table)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
