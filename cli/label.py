"""`digiq label`: ε-labels of visual change with the label-balance gate, or `--sweep` to choose ε."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import Flag, out, stage_command


def register(app: typer.Typer) -> None:
    sweep = Flag("--sweep", "only print/plot the Yes fraction against label.sweep_epsilons (writes no labels)", type=bool, default=False)
    stage_command(app, "label", label, out("label.out", "label table (Parquet)"), sweep)


def label(params: Any, sweep: bool) -> None:
    """ε-labels: MSE of the downscaled screenshots of each non-terminal transition, Yes when above ε."""
    from digiq.pipelines import label as stage

    section = params.label
    if sweep:
        table, counts, png = stage.run_sweep(params, progress=True)
        _print_sweep(table, counts, section.epsilon)
        typer.echo(f"wrote {Path(section.plots) / stage.SWEEP_CSV}")
        typer.echo(f"wrote {png}" if png else "matplotlib is not installed: no PNG plot (render the CSV with `dvc plots show`)")
        return
    outcome = stage.run(params, progress=True, report=_print_summary)
    typer.echo(f"wrote {section.out}, {section.metrics}, {section.checks}/index.html, "
               f"{Path(section.plots) / stage.SWEEP_CSV} ({outcome.seconds:.1f} s)")


def _pct(value: float | None) -> str:
    return "–" if value is None or value != value else f"{100 * value:.1f} %"  # None/NaN: no samples


def _print_summary(m: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ε-labels (ε = {m['epsilon']:g}, scale {m['scale']:g}, {m['resample']} filter)")
    for column in ("kind", "n", "Yes", "median MSE", "gate band"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, e in m["per_kind"].items():
        band = f"[{e['band'][0]:g}, {e['band'][1]:g}]" if e["gated"] else f"not gated (n < {m['min_count']})"
        table.add_row(kind, str(e["n"]), _pct(e["yes_fraction"]), f"{e['mse'].get('p50', float('nan')):.1f}", band)
    table.add_row("overall", str(m["labelled"]), _pct(m["yes_fraction"]), f"{m['mse'].get('p50', float('nan')):.1f}", f"[{m['yes_band'][0]:g}, {m['yes_band'][1]:g}]", style="bold")
    Console().print(table)
    ex = m["excluded"]
    typer.echo(f"{m['steps']} steps: {m['labelled']} labelled, {ex['terminal']} terminal and {ex['no_next_screenshot']} without a next screenshot excluded")


def _print_sweep(table: Any, counts: dict[str, int], epsilon: float) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title='fraction labelled "Yes" against ε (* = configured ε)')
    out.add_column("ε", justify="right")
    out.add_column(f"overall (n={sum(counts.values())})", justify="right")
    for kind in table.columns[2:]:
        out.add_column(f"{kind} (n={counts[kind]})", justify="right")
    for row in table.itertuples(index=False):
        mark = "*" if row[0] == epsilon else ""
        out.add_row(f"{row[0]:g}{mark}", *(_pct(v) for v in row[1:]))
    Console().print(out)
