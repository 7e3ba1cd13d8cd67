"""`digiq data stats|show` and `digiq import-digiq` (written by the store/importer owner)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


def register(root: typer.Typer) -> None:
    """Top-level commands that belong with the data utilities (e.g. import-digiq)."""
