"""`digiq view`: build the static trajectory and critic viewer for a dataset; open it or serve it locally."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick


def register(root: typer.Typer) -> None:
    root.command("view", help="Write a static trajectory/critic viewer site for a dataset (opens from file://).")(view)


@handle_errors
def view(
    dataset: Path = typer.Argument(..., help="dataset folder (digiq.store layout)"),
    critic: Path | None = typer.Option(None, "--critic", help="critic output folder: step_scores.parquet [+ candidate_scores.parquet]"),
    policy: Path | None = typer.Option(None, "--policy", help="policy output folder: policy_scores.parquet"),
    labels: Path | None = typer.Option(None, "--labels", help="ε-label table [default: params label.out, when it exists]"),
    no_labels: bool = typer.Option(False, "--no-labels", help="do not show ε-labels even if the default table exists"),
    out: Path | None = typer.Option(None, "--out", "-o", help="site folder, replaced as a whole [default: params view.out]"),
    top_k: int | None = typer.Option(None, "--top-k", min=1, help="candidates shown per step [default: params view.top_k]"),
    open_site: bool = typer.Option(False, "--open", help="open the site in the default web browser"),
    serve: bool = typer.Option(False, "--serve", help="serve the site on 127.0.0.1 until Ctrl-C"),
    port: int | None = typer.Option(None, "--port", min=0, max=65535, help="port for --serve (0: any free) [default: params view.port]"),
    params_path: Path = PARAMS_OPTION,
) -> None:
    from digiq.viewer.site import build_site

    params = load(params_path)
    settings = view_settings(params)
    summary = _with_progress(
        lambda progress: build_site(
            dataset,
            pick(out, Path(settings.out)),
            labels=None if no_labels else labels_path(labels, Path(params.label.out)),
            critic=pick(critic, settings.critic),
            policy=pick(policy, settings.policy),
            top_k=pick(top_k, settings.top_k),
            page_size=settings.page_size,
            progress=progress,
        )
    )
    for warning in summary.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"wrote {summary.index} ({summary.trajectories} trajectories, {summary.steps} steps, "
        f"{summary.images} screenshots) in {summary.seconds:.1f} s"
    )
    if serve:
        _serve(summary.out, pick(port, settings.port), open_site)
    elif open_site:
        import webbrowser

        webbrowser.open(summary.index.resolve().as_uri())


def view_settings(params):  # -> digiq.viewer.options.ViewParams
    """The ``view:`` section of params.yaml (its defaults until digiq.config carries the section)."""
    from digiq.viewer.options import ViewParams

    return getattr(params, "view", None) or ViewParams()


def labels_path(given: Path | None, default: Path) -> Path | None:
    """An explicit --labels must exist (checked on load); the default table is used only when present."""
    if given is not None:
        return given
    return default if default.is_file() else None


def _with_progress(build):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("pages"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("pages", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return build(progress)


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
