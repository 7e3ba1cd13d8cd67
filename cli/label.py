"""`digiq label`: ε-labels of visual change with the label-balance gate, or `--sweep` to choose ε."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick

# LabelParams fields this command reads beyond epsilon/scale/yes_band/out, with their defaults until
# digiq/config.py carries them (see the label section of params.yaml).
_EXTRA_DEFAULTS: dict[str, Any] = {
    "kind_bands": {},
    "min_count": 30,
    "resample": "box",
    "sweep_epsilons": [5.0, 10.0, 20.0, 30.0, 50.0, 80.0],
}


def register(app: typer.Typer) -> None:
    app.command("label")(label)


@handle_errors
def label(
    dataset: Path | None = typer.Option(None, "--dataset", help="dataset folder [params: collect.out]"),
    epsilon: float | None = typer.Option(None, "--epsilon", help="label Yes when the downscaled MSE exceeds ε [params: label.epsilon]"),
    scale: float | None = typer.Option(None, "--scale", help="downscale factor before the MSE [params: label.scale]"),
    out: Path | None = typer.Option(None, "--out", help="label table (Parquet) [params: label.out]"),
    sweep: bool = typer.Option(False, "--sweep", help="only print/plot the Yes fraction against ε (writes no labels)"),
    eps: str | None = typer.Option(None, "--eps", help="ε values for --sweep, comma-separated [params: label.sweep_epsilons]"),
    metrics: Path = typer.Option(Path("metrics/label.json"), "--metrics", help="metrics file"),
    checks: Path = typer.Option(Path("data/checks/label"), "--checks", help="Data Docs folder of the label-balance gate"),
    plots: Path = typer.Option(Path("plots"), "--plots", help="folder for label_sweep.csv (and .png with --sweep)"),
    params: Path = PARAMS_OPTION,
) -> None:
    """ε-labels: MSE of the downscaled screenshots of each non-terminal transition, Yes when above ε."""
    from digiq.labels import parse_epsilons
    from digiq.pipelines import label as stage

    cfg = load(params)
    p = cfg.label
    extra = {name: getattr(p, name, default) for name, default in _EXTRA_DEFAULTS.items()}
    dataset = pick(dataset, Path(cfg.collect.out))
    scale = pick(scale, p.scale)
    epsilon = pick(epsilon, p.epsilon)
    if sweep:
        epsilons = parse_epsilons(eps) if eps else [float(e) for e in extra["sweep_epsilons"]]
        table, counts, png = stage.run_sweep(dataset, scale, epsilons, extra["resample"], plots, progress=True, epsilon=epsilon)
        _print_sweep(table, counts, epsilon)
        typer.echo(f"wrote {plots / stage.SWEEP_CSV}")
        typer.echo(f"wrote {png}" if png else "matplotlib is not installed: no PNG plot (render the CSV with `dvc plots show`)")
        return
    outcome = stage.run(
        dataset,
        pick(out, Path(p.out)),
        epsilon,
        scale,
        tuple(p.yes_band),
        kind_bands={k: tuple(v) for k, v in extra["kind_bands"].items()},
        min_count=extra["min_count"],
        resample=extra["resample"],
        sweep_epsilons=extra["sweep_epsilons"],
        metrics_path=metrics,
        checks_dir=checks,
        plots_dir=plots,
        progress=True,
        report=_print_summary,
    )
    typer.echo(f"wrote {pick(out, Path(p.out))}, {metrics}, {checks}/index.html, {plots / stage.SWEEP_CSV} ({outcome.seconds:.1f} s)")


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
