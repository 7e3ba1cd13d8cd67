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

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params file: every setting's default")
SET_OPTION = typer.Option(None, "-S", "--set", metavar="SECTION.KEY=VALUE",
                          help="override one setting, as `dvc exp run -S` does (repeatable), e.g. -S critic.updates=500")


def load(params_path: Path, overrides: list[str] | None = None, flags: dict[str, Any] | None = None):
    """The validated params: the file (defaults where it is absent), then ``-S`` overrides, then the command's
    everyday flags given as ``{"section.key": value}`` (a flag left out is None and changes nothing)."""
    from digiq.params_file import load_params

    given = [f"{key}={_override_value(value)}" for key, value in (flags or {}).items() if value is not None]
    return load_params(params_path, [*(overrides or []), *given])


def comma_list(text: str | None) -> list[str] | None:
    """A comma-separated flag (``--tasks a,b``) as a list; None when the flag was not given."""
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _override_value(value: Any) -> str:
    from digiq.params_file import hydra_value

    return hydra_value(str(value) if isinstance(value, Path) else value)


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
