"""Great Expectations gates: suites are plain lists of ``Expect`` in the code, run in an ephemeral GX context.

    result = run_suite("labels", df, [Expect("ExpectColumnValuesToBeInSet",
                                             {"column": "label", "value_set": ["Yes", "No"]},
                                             "labels are Yes/No")], docs_dir=Path("data/checks/label"))
    result.raise_for_failures("data/labels.parquet")   # DigiqError: one line naming each failed check

``great_expectations`` is slow to import (docs/benchmarks.md), so it is imported inside ``run_suite`` only.
With ``docs_dir``, the folder is replaced atomically by a local Data Docs site (``index.html``; its CSS
comes from a CDN, so it looks unstyled offline) plus ``result.json`` (``SuiteResult.to_json()``).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digiq.atomic import atomic_path, write_json
from digiq.errors import DigiqError

RESULT_FILE = "result.json"
_DOCS_SITE = "digiq_local"
_INDEX_KEY = "digiq_index"  # position in the suite, kept in each expectation's meta (GX reorders results)


@dataclass(frozen=True)
class Expect:
    """One expectation: a GX 1.x expectation class name, its keyword arguments, and what it checks (for humans)."""

    kind: str  # e.g. "ExpectColumnValuesToBeBetween"
    kwargs: dict[str, Any]
    description: str  # used in failure messages and shown in Data Docs


@dataclass
class SuiteResult:
    """Outcome of one suite run; ``results`` has one dict per expectation, in suite order."""

    name: str
    success: bool
    failures: list[str]  # "<description> (observed …)" for each failed expectation
    results: list[dict[str, Any]]  # description, expectation, success, observed, details
    statistics: dict[str, Any] = field(default_factory=dict)
    docs: Path | None = None  # the Data Docs page, when the suite wrote one

    def raise_for_failures(self, file: str | Path | None) -> None:
        """DigiqError "<file>: <suite> failed: <desc> (observed …); … (details: <Data Docs page>)" when any check
        failed."""
        if not self.success:
            details = f" (details: {self.docs})" if self.docs is not None else ""
            raise DigiqError(f"{self.name} failed: " + "; ".join(self.failures) + details, file=file)

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.name,
            "success": self.success,
            "failures": list(self.failures),
            "statistics": dict(self.statistics),
            "results": [dict(r) for r in self.results],
        }


def run_suite(name: str, df: Any, expectations: list[Expect], docs_dir: Path | None = None) -> SuiteResult:
    """Validate a pandas DataFrame against ``expectations``; optionally write Data Docs + result.json to docs_dir."""
    if not expectations:
        raise DigiqError(f"suite {name!r} has no expectations", field="expectations")
    gx = _import_gx()
    built = [_build_expectation(gx, e, index) for index, e in enumerate(expectations)]
    with _quiet():
        context = gx.get_context(mode="ephemeral")
        _disable_progress_bars(context)
        batch = (
            context.data_sources.add_pandas(f"{name}_source")
            .add_dataframe_asset(f"{name}_frame")
            .add_batch_definition_whole_dataframe(f"{name}_batch")
        )
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in built:
            suite.add_expectation(expectation)
        validation = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        raw = validation.run(batch_parameters={"dataframe": df})
    result = _summarise(name, expectations, raw.to_json_dict())
    if docs_dir is not None:
        _write_docs(context, Path(docs_dir), result)
        result.docs = Path(docs_dir) / "index.html"
    return result


# --- building ------------------------------------------------------------------------------------------


def _import_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no network here; never phone home
    import great_expectations as gx

    return gx


def _build_expectation(gx: Any, expect: Expect, index: int) -> Any:
    cls = getattr(gx.expectations, expect.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, gx.expectations.Expectation)):
        names = [n for n in dir(gx.expectations) if n.startswith("Expect")]
        close = difflib.get_close_matches(expect.kind, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DigiqError(f"unknown Great Expectations expectation {expect.kind!r}{hint}", field="kind")
    meta = {**expect.kwargs.get("meta", {}), "description": expect.description, _INDEX_KEY: index}
    try:
        return cls(**{**expect.kwargs, "meta": meta, "description": expect.description})
    except (TypeError, ValueError) as exc:  # GX validates kwargs with pydantic (a ValueError)
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise DigiqError(f"invalid arguments for {expect.kind} ({expect.description}): {detail}", field="kwargs") from None


def _disable_progress_bars(context: Any) -> None:
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence GX's loggers and warnings for the duration (its output is noise in a stage log).

    Some GX modules set their own logger level (INFO), so every ``great_expectations.*`` logger is raised to ERROR.
    """
    loggers = [logging.getLogger("great_expectations")] + [
        logger
        for name, logger in list(logging.root.manager.loggerDict.items())
        if name.startswith("great_expectations.") and isinstance(logger, logging.Logger)
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# --- reading results -----------------------------------------------------------------------------------


def _summarise(name: str, expectations: list[Expect], raw: dict[str, Any]) -> SuiteResult:
    results, failures = [], []
    by_index = {item["expectation_config"]["meta"][_INDEX_KEY]: item for item in raw["results"]}
    for index, expect in enumerate(expectations):
        item = by_index[index]
        observed = observed_text(item)
        entry = {
            "description": expect.description,
            "expectation": expect.kind,
            "success": bool(item["success"]),
            "observed": observed,
            "details": _jsonable(item.get("result", {})),
        }
        results.append(entry)
        if not entry["success"]:
            failures.append(f"{expect.description} ({observed})")
    return SuiteResult(name=name, success=bool(raw["success"]), failures=failures, results=results, statistics=_jsonable(raw.get("statistics", {})))


def observed_text(item: dict[str, Any]) -> str:
    """A short human reading of one GX expectation result: observed value, unexpected rows, or the error."""
    error = _exception_message(item.get("exception_info") or {})
    if error:
        return f"error: {error}"
    result = item.get("result") or {}
    if "observed_value" in result:
        return f"observed {_fmt(result['observed_value'])}"
    if "unexpected_count" in result:
        count, total = result["unexpected_count"], result.get("element_count")
        examples = result.get("partial_unexpected_list") or []
        text = f"observed {count} of {total} rows unexpected"
        if examples:
            text += ", e.g. " + ", ".join(_fmt(v) for v in examples[:3])
        return text
    return "observed nothing"


def _exception_message(info: dict[str, Any]) -> str | None:
    if info.get("raised_exception"):
        return _first_line(info.get("exception_message"))
    for value in info.values():  # GX 1.x may key exception info by metric id
        if isinstance(value, dict) and value.get("raised_exception"):
            return _first_line(value.get("exception_message"))
    return None


def _first_line(message: Any) -> str:
    line = (str(message).strip().splitlines() or [""])[0]
    return line.removeprefix("Error: ")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value[:5]) + (", …]" if len(value) > 5 else "]")
    if hasattr(value, "item"):  # numpy scalar
        return _fmt(value.item())
    return repr(value) if isinstance(value, str) else str(value)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# --- Data Docs -----------------------------------------------------------------------------------------


def _write_docs(context: Any, docs_dir: Path, result: SuiteResult) -> None:
    """Build a local Data Docs site into a temporary folder, add result.json, and swap it in atomically."""
    with atomic_path(docs_dir) as tmp, _quiet():
        tmp.mkdir(parents=True)
        context.add_data_docs_site(
            site_name=_DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(tmp.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        context.build_data_docs(site_names=[_DOCS_SITE])
        write_json(tmp / RESULT_FILE, result.to_json())
