"""Shared CLI plumbing: params loading, option defaults, one-line errors."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Flag:
    """A command-line option: an everyday shortcut for one setting (``key``), or, with no key, an option that is not a
    setting and reaches the command's function as a keyword argument."""

    name: str
    help: str
    key: str | None = None
    type: Any = str
    default: Any = None
    convert: Callable[[Any], Any] | None = None
    metavar: str | None = None

    @property
    def param(self) -> str:
        return self.name.split("/")[0].lstrip("-").replace("-", "_")

    def parameter(self) -> inspect.Parameter:
        annotation = self.type if self.default is not None else self.type | None
        option = typer.Option(self.default, self.name, help=self.help, metavar=self.metavar)
        return inspect.Parameter(self.param, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)

    def setting(self, given: Any) -> Any:
        return self.convert(given) if self.convert and given is not None else given


def out(key: str, help: str) -> Flag:
    return Flag("--out", help, key, Path)


def variant(key: str) -> Flag:
    return Flag("--variant", "embedding variant: finetuned | off_the_shelf | no_vlm", key)


def device(key: str) -> Flag:
    return Flag("--device", "auto | cpu | cuda | cuda:N", key)


def seed(key: str, help: str = "base seed") -> Flag:
    return Flag("--seed", help, key, int)


def workers(key: str) -> Flag:
    return Flag("--workers", "parallel browser processes", key, int)


def episodes(key: str) -> Flag:
    return Flag("--episodes", "episodes per task", key, int)


def tasks(key: str) -> Flag:
    return Flag("--tasks", "MiniWoB task names, comma-separated", key, convert=comma_list)


def stage_command(app: typer.Typer, name: str, action: Callable[..., None], *flags: Flag) -> None:
    """Register ``digiq NAME [--params FILE] [-S key=value]… [flags]``: ``action(params, **options)`` gets the
    validated settings (file, then ``-S``, then the flags that set one) and the options that are not settings.
    Its docstring is the command's help."""

    def command(params: Path, overrides: list[str] | None, **given: Any) -> None:
        settings = {flag.key: flag.setting(given[flag.param]) for flag in flags if flag.key}
        options = {flag.param: given[flag.param] for flag in flags if not flag.key}
        action(load(params, overrides, settings), **options)

    common = [inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, default=PARAMS_OPTION, annotation=Path),
              inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, default=SET_OPTION, annotation=list[str] | None)]
    command.__signature__ = inspect.Signature([*common, *(flag.parameter() for flag in flags)])  # type: ignore[attr-defined]
    command.__annotations__ = {}  # typer reads the types from the signature
    command.__doc__ = action.__doc__
    app.command(name)(handle_errors(command))


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
