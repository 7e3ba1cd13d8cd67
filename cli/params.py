"""`digiq params`: params.yaml as the configs declare it, each setting with its one-line description."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("params")(params_command)


@handle_errors
def params_command(
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
    defaults: bool = typer.Option(False, "--defaults", help="the declared defaults, ignoring the params file"),
) -> None:
    """Print the settings in effect (the params file with -S overrides applied) as params.yaml.

    `digiq params --defaults > params.yaml` regenerates the repository's file from the configs."""
    from digiq.config import Params
    from digiq.params_file import params_yaml

    typer.echo(params_yaml(Params() if defaults else load(params, overrides)), nl=False)
