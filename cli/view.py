"""`digiq view`: build the static trajectory and critic viewer for a dataset; open it or serve it locally."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load


def register(root: typer.Typer) -> None:
    root.command("view", help="Write a static trajectory/critic viewer site for a dataset (opens from file://).")(view)


@handle_errors
def view(
    dataset: Path = typer.Argument(..., help="dataset folder (digiq.store layout)"),
    params_path: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
    out: Path | None = typer.Option(None, "--out", "-o", help="site folder, replaced as a whole"),
    critic: Path | None = typer.Option(None, "--critic", help="critic output folder: step_scores.parquet [+ candidate_scores.parquet]"),
    policy: Path | None = typer.Option(None, "--policy", help="policy output folder: policy_scores.parquet"),
    labels: Path | None = typer.Option(None, "--labels", help="ε-label table [default: the label stage's table, when it exists]"),
    no_labels: bool = typer.Option(False, "--no-labels", help="do not show ε-labels even if the default table exists"),
    open_site: bool = typer.Option(False, "--open", help="open the site in the default web browser"),
    serve: bool = typer.Option(False, "--serve", help="serve the site on 127.0.0.1 (view.port) until Ctrl-C"),
) -> None:
    from digiq.progress import progress_bar
    from digiq.viewer.site import build_site

    params = load(params_path, overrides, {"view.out": out, "view.critic": critic, "view.policy": policy})
    settings = params.view
    with progress_bar("pages", None, stderr=True) as bar:
        summary = build_site(dataset, settings.out, labels=None if no_labels else labels_path(labels, Path(params.label.out)),
                             critic=settings.critic, policy=settings.policy, top_k=settings.top_k,
                             page_size=settings.page_size, progress=lambda done, total: bar.update(completed=done, total=total))
    for warning in summary.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"wrote {summary.index} ({summary.trajectories} trajectories, {summary.steps} steps, "
        f"{summary.images} screenshots) in {summary.seconds:.1f} s"
    )
    if serve:
        _serve(summary.out, settings.port, open_site)
    elif open_site:
        import webbrowser

        webbrowser.open(summary.index.resolve().as_uri())


def labels_path(given: Path | None, default: Path) -> Path | None:
    """An explicit --labels must exist (checked on load); the default table is used only when present."""
    if given is not None:
        return given
    return default if default.is_file() else None


def _serve(site: Path, port: int, open_site: bool) -> None:
    from digiq.viewer.site import make_server

    server = make_server(site, port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    typer.echo(f"serving {site} at {url} (Ctrl-C to stop)")
    if open_site:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()
