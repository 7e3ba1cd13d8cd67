"""`digiq params`: params.yaml as the configs declare it, each setting with its one-line description."""

from __future__ import annotations

from typing import Any

import typer

from digiq.cli.common import Flag, stage_command


def register(app: typer.Typer) -> None:
    stage_command(app, "params", show, Flag("--defaults", "the declared defaults, ignoring the params file and -S", type=bool, default=False))


def show(params: Any, defaults: bool) -> None:
    """Print the settings in effect (the params file with -S overrides applied) as params.yaml.

    `digiq params --defaults > params.yaml` regenerates the repository's file from the configs."""
    from digiq.config import Params
    from digiq.params_file import params_yaml

    typer.echo(params_yaml(Params() if defaults else params), nl=False)
