"""`digiq data stats|show|regime` and `digiq import-digiq`.

Only typer and the stdlib at module top: rich, torch and the library load inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load

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


@app.command("regime")
@handle_errors
def regime(
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default: params collect.out)."),
    candidates: Path | None = typer.Option(None, "--candidates", help="Candidate table (default: params candidates.out)."),
    eval_metrics: Path | None = typer.Option(None, "--eval", help="evaluate's metrics, for behavior-mode's live success (default: params evaluate.out)."),
    identity: str | None = typer.Option(None, "--identity", help="State identity: semantic | exact (default: params regime.identity)."),
    gate: bool | None = typer.Option(None, "--gate/--no-gate", help="Check the regime's bands, exit 2 outside them (default: params regime.gate)."),
    as_json: bool = typer.Option(False, "--json", help="Print the regime as JSON instead of a table."),
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """Per task: π_β's sample success, mode agreement and live mode success, horizons, states with contrast,
    mode-wrong states with supported corrections and how often π_β draws the correction (digiq/regime.py)."""
    from digiq.config import validated
    from digiq.regime import RegimeParams, check_regime, dataset_regime

    settings = load(params, overrides)
    given = getattr(settings, "regime", None) or RegimeParams()  # Params embeds it as `regime` (else its defaults)
    flags = {key: value for key, value in {"identity": identity, "gate": gate}.items() if value is not None}
    bands = validated(RegimeParams, {**given.model_dump(), **flags}, "regime")
    summary = dataset_regime(data or Path(settings.collect.out), candidates or Path(settings.candidates.out),
                             eval_metrics or Path(settings.evaluate.out), bands.identity)
    result = check_regime(summary, bands) if bands.gate else None
    if as_json:
        typer.echo(json.dumps({**summary, "gate": None if result is None else {"success": result.success, "failures": result.failures}}, indent=2))
    else:
        _print_regime(summary, result)
    if result is not None:
        result.raise_for_failures(summary["raw"])


@handle_errors
def import_digiq(
    file: Path = typer.Argument(..., help="Official Digi-Q / DigiRL trajectory file (.pt).", show_default=False),
    images: Path = typer.Option(
        ..., "--images", help="Folder holding the screenshots; the file's absolute image paths are matched by file name.", show_default=False
    ),
    out: Path | None = typer.Option(None, "--out", help="Dataset folder to write."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad trajectories (and report how many) instead of stopping at the first."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT when it exists and is not empty."),
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """Import an official Digi-Q / DigiRL .pt file (safely: no code from the file runs) as a digiq dataset.

    Writes the step table and screenshots, plus candidates.parquet (action_list), precomputed.parquet
    (image_features, q_rep_out) and official.parquet (source fields) when the file has them.
    The returns use the params' discount γ (`-S gamma=0.95`). The output appears only when the whole import succeeded.
    """
    from digiq.importer import ImportOptions, import_official
    from digiq.progress import progress_bar

    settings = load(params, overrides, {"collect.out": out})
    options = ImportOptions(gamma=settings.gamma, skip_bad=skip_bad, overwrite=overwrite)
    with progress_bar(f"loading {file.name}", None) as bar:

        def advance(done: int, total: int) -> None:
            bar.update(description="importing trajectories", completed=done, total=total)

        report = import_official(file, images, Path(settings.collect.out), options, progress=advance)
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
    from rich.markup import escape

    header = (f"[bold]{escape(summary.path)}[/bold]  source={escape(str(summary.source))}  γ={summary.gamma}\n"
              f"trajectories {summary.trajectories}   steps {summary.steps}   "
              f"success rate {_percent(summary.success_rate)}   mean length {_number(summary.mean_length)}")
    kinds = _table(("kind", "steps", "share"), left=("kind",), title="actions by kind")
    for kind, n in summary.action_kinds.items():
        kinds.add_row(kind, str(n), _percent(n / summary.steps))
    per_task = _table(("task", "trajectories", "steps", "success", "mean length", "actions"), left=("task", "actions"),
                      title="per task")
    for task in summary.tasks:
        actions = ", ".join(f"{kind} {n}" for kind, n in task.action_kinds.items())
        per_task.add_row(escape(task.task), str(task.trajectories), str(task.steps), _percent(task.success_rate), _number(task.mean_length), actions)
    tables = ["tables: " + ", ".join(f"{name} ({rows} rows)" for name, rows in summary.tables.items())] if summary.tables else []
    _show(header, kinds, per_task, *tables)


def _print_regime(summary: dict, result) -> None:  # SuiteResult | None
    """Two tables that fit 80 columns: π_β and horizons, then contrast and corrections; the legend; the gate."""
    from rich import box
    from rich.markup import escape

    from digiq.regime import COLUMNS, LEGEND, rows

    cells = rows(summary, unmeasured="n/m", space="")
    tables = []
    for title, part in (("regime: π_β and horizons", slice(0, 6)),
                        (f"contrast and corrections (state identity: {summary['identity']})", slice(6, None))):
        table = _table(("task", *(short for short, _, _, _ in COLUMNS[part])), left=("task",), box=box.SIMPLE_HEAD,
                       title=escape(title))
        for name, values in cells:
            table.add_row(escape(name), *values[part], style="bold" if name == "suite" else None)
        tables.append(table)
    source = summary["eval"] or "n/m, not measured (no behavior-mode in evaluate's greedy metrics)"
    lines = [f"[dim]{escape(LEGEND)}[/dim]",
             f"data: {escape(summary['raw'])}\ncandidates: {escape(summary['candidates'])}\nlive mode success: {escape(source)}"]
    if result is not None:
        lines.append("[green]regime gate passed[/green]" if result.success
                     else "[red]regime gate failed:[/red]\n  " + "\n  ".join(escape(f) for f in result.failures))
    _show(*tables, *lines)


def _print_trajectory(view) -> None:  # TrajectoryView
    from rich.markup import escape

    with_candidates = any(step.candidates is not None for step in view.steps)
    columns = ("step", "action", "reward", "done", "return", "screenshot") + (("cands",) if with_candidates else ())
    table = _table(columns, left=("action", "done", "screenshot"), overflow="fold", show_lines=True)
    for step in view.steps:
        shots = escape(step.screenshot + (f"\n→ {step.next_screenshot}" if step.next_screenshot else ""))
        row = [str(step.step_id), f"{escape(step.description)}\n[dim]{escape(step.action)}[/dim]", f"{step.reward:g}", "yes" if step.done else "no", f"{step.mc_return:.4f}", shots]
        table.add_row(*row, *([str(step.candidates)] if with_candidates else []))
    _show(f"[bold]trajectory {escape(view.traj_id)}[/bold]  task: {escape(view.task)}\ngoal: {escape(view.goal)}\n"
          f"{len(view.steps)} steps, total reward {view.total_reward:g}, {'success' if view.success else 'failure'}", table)


def _table(columns: tuple[str, ...], left: tuple[str, ...], *, overflow: str = "ellipsis", **options):  # -> rich Table
    """A rich table whose ``left`` columns are left-aligned and the others (numbers) right-aligned."""
    from rich.table import Table

    table = Table(**options)
    for name in columns:
        table.add_column(name, justify="left" if name in left else "right", overflow=overflow)
    return table


def _show(*renderables) -> None:
    from rich.console import Console

    console = Console()
    for renderable in renderables:
        console.print(renderable)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
