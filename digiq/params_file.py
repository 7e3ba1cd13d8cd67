"""params.yaml as a file: reading it, `-S section.key=value` overrides in DVC's grammar, presets, and writing it
back from the section models of :mod:`digiq.config` (each setting's description as its comment).

A typo gets a did-you-mean hint, a wrong value names the file (or the override) and the dotted field.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from digiq.config import Params
from digiq.errors import DigiqError

PARAMS_FILE = "params.yaml"


def load_params(path: str | Path = PARAMS_FILE, overrides: Sequence[str] = ()) -> Params:
    """Read and validate params.yaml (the defaults where the file is absent), then apply ``-S section.key=value``
    overrides in DVC's (Hydra's) grammar, each validated on its own so that an error names the one at fault."""
    path = Path(path)
    raw = read_sections(path) if path.exists() else {}
    params = validate_params(raw, path)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
        params = validate_params(raw, f"-S {text}")
    return params


def parse_override(text: str) -> tuple[str, Any]:
    """``critic.updates=500`` → ("critic.updates", 500), parsed by Hydra's override parser as ``dvc exp run -S`` is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from digiq.errors import first_line

    try:
        (override,) = OverridesParser.create().parse_overrides([text])
    except HydraException as exc:
        raise DigiqError(f"not a section.key=value override ({first_line(exc)})", field=f"-S {text}") from None
    if override.is_delete() or override.is_add() or override.is_force_add() or override.is_sweep_override():
        raise DigiqError("only plain section.key=value overrides are supported", field=f"-S {text}")
    return override.key_or_group, _plain(override.value())


def _plain(value: Any) -> Any:
    """Hydra's parsed value as plain Python (its lists and dicts are their own types)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key`` "a.b.c", creating the sections on the way."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def read_sections(path: str | Path) -> dict[str, Any]:
    """A params-style YAML file as a mapping (one clear error for bad YAML or another top-level type)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise DigiqError(f"cannot read: {exc.strerror}", file=path) from None
    except yaml.YAMLError as exc:
        raise yaml_error(exc, path) from None
    if not isinstance(raw, dict):
        raise DigiqError("expected a mapping of sections at the top level", file=path)
    return raw


def preset_overrides(preset: str | Path, params_path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The dotted-key overrides (``finetune.device: cuda``…) of a preset: a partial params.yaml, such as
    ``profiles/llava-1.5-7b.yaml``. Refused (naming the preset and the key) unless params.yaml with the
    preset merged in validates."""
    overrides = _dotted(read_sections(preset))
    merged = read_sections(params_path) if Path(params_path).exists() else {}
    for key, value in overrides.items():
        _set_dotted(merged, key, value)
    validate_params(merged, preset)
    return overrides


def dvc_set_flags(overrides: dict[str, Any]) -> list[str]:
    """``dvc exp run`` arguments setting ``overrides``: ["-S", "key=value", …] in Hydra's override grammar, which
    DVC parses (strings quoted: a regex's parentheses would otherwise not parse)."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={hydra_value(value)}")]


def hydra_value(value: Any) -> str:
    """``value`` as the right-hand side of a ``-S key=value`` override."""
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    return _yaml_flow(value)  # numbers, booleans, null


def _dotted(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def yaml_error(exc: Exception, path: str | Path) -> DigiqError:
    """A YAML syntax error in one line, naming the line (and column) it was found at."""
    from digiq.errors import first_line

    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return DigiqError(f"invalid YAML ({first_line(exc)})", file=path)
    context = getattr(exc, "context", None)
    started = getattr(exc, "context_mark", None)
    where = f" ({context} that starts at line {started.line + 1}, column {started.column + 1})" if context and started else ""
    return DigiqError(f"invalid YAML: {exc.problem}{where}", file=path, field=f"line {mark.line + 1}, column {mark.column + 1}")


def validate_params(raw: dict[str, Any], path: str | Path = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(p) for p in problem["loc"])
        if problem["type"] == "extra_forbidden":
            raise DigiqError(f"unknown key{_did_you_mean(problem['loc'])}", file=path, field=field) from None
        raise DigiqError(f"{problem['msg']} (got {problem.get('input')!r})", file=path, field=field) from None


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def params_yaml(params: Params | None = None) -> str:
    """params.yaml text for the given (default) params, with each field's description as a comment."""
    params = params or Params()
    lines: list[str] = []
    for name, field in Params.model_fields.items():
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            lines.append(f"{name}:")
            lines.extend(f"  {_yaml_line(sub, getattr(value, sub), subfield.description)}" for sub, subfield in type(value).model_fields.items())
        else:
            lines.append(_yaml_line(name, value, field.description))
    return "\n".join(lines) + "\n"


def _yaml_line(key: str, value: Any, description: str | None) -> str:
    comment = f"  # {description}" if description else ""
    return f"{key}: {_yaml_flow(value)}{comment}"


def _yaml_flow(value: Any) -> str:
    """One-line YAML of ``value`` (nested models and tuples as plain YAML types)."""
    import yaml

    from pydantic_core import to_jsonable_python

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    text = yaml.dump(to_jsonable_python(value), Dumper=_NoAliases, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()
