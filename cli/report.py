"""`digiq report`: reports/report.md and a self-contained reports/report.html from the stage outputs."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("report")(report)


@handle_errors
def report(
    eval_metrics: str | None = typer.Option(None, "--eval", help="evaluation metrics (required input) [params: report.eval]"),
    out_md: str | None = typer.Option(None, "--md", help="Markdown report [params: report.out_md]"),
    out_html: str | None = typer.Option(None, "--html", help="HTML report [params: report.out_html]"),
    experiments: bool | None = typer.Option(None, "--experiments/--no-experiments", help="read ablations with dvc exp show [params: report.experiments]"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Main table beside the paper's numbers, per-task and ablation tables, label balance, critic diagnostics,
    data checks, params and data hashes."""
    from digiq.pipelines import report as stage
    from digiq.report import ReportParams

    cfg = load(params)
    base: ReportParams = getattr(cfg, "report", None) or ReportParams()
    overrides = {"eval": eval_metrics, "out_md": out_md, "out_html": out_html, "experiments": experiments}
    settings = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    md, page = stage.run(settings, params)
    typer.echo(f"wrote {md}, {page}")
