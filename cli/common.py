"""Shared CLI plumbing: params loading, option defaults, one-line errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from digiq.errors import DigiqError

F = TypeVar("F", bound=Callable[..., Any])

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read defaults from")


def load(params_path: Path):
    """The validated params (defaults where the file is absent)."""
    from digiq.config import load_params

    return load_params(params_path)


def pick(value: Any, default: Any) -> Any:
    """A CLI option wins over params.yaml when it is given."""
    return default if value is None else value


def handle_errors(fn: F) -> F:
    """Turn a DigiqError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DigiqError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def fail(message: str, *, file: str | Path | None = None, field: str | None = None) -> None:
    raise DigiqError(message, file=file, field=field)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
