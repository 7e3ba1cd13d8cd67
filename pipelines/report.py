"""`digiq report`: gather the stage outputs and write reports/report.md + a self-contained reports/report.html.

Inputs (paths from the ``report:`` params): metrics/eval.json (required; a table per evaluation protocol), metrics/label.json,
metrics/critic.json, every GX ``result.json`` under the checks folder, ``dvc exp show`` (ablations),
dvc.lock (data hashes; without it the configured paths are hashed here) and params.yaml.
Any missing optional input becomes a note in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq import report as R
from digiq.atomic import write_text
from digiq.errors import DigiqError

if TYPE_CHECKING:
    from digiq.config import Params

TITLE = "Digi-Q on MiniWoB++: results"


def read_json(path: str | Path, required: bool = False) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        if required:
            raise DigiqError("missing (run `digiq evaluate` first)", file=path)
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DigiqError(f"not valid JSON ({exc.msg}, line {exc.lineno})", file=path) from None
    if not isinstance(data, dict):
        raise DigiqError("expected a JSON object", file=path)
    return data


def check_results(folder: str | Path) -> dict[str, dict[str, Any]]:
    root = Path(folder)
    if not root.is_dir():
        return {}
    return {str(p): d for p in sorted(root.rglob("result.json")) if (d := read_json(p)) is not None}


def experiments() -> tuple[list[dict[str, Any]] | None, str]:
    """``dvc.api.exp_show()`` rows that are experiments (not the workspace/baseline); (None, why) when unavailable."""
    try:
        import dvc.api

        rows = dvc.api.exp_show()
    except Exception as exc:  # noqa: BLE001 - no git/DVC repo, no commits, …: the report still gets written
        return None, f"dvc exp show failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    exps = [r for r in rows if r.get("typ") not in ("baseline",) and r.get("rev") != "workspace"]
    return exps, "" if exps else "dvc exp show lists no experiments"


def lock_hashes(lock: str | Path) -> list[list[str]] | None:
    """(stage: path, md5) for every dependency and output in dvc.lock."""
    import yaml

    path = Path(lock)
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    rows = []
    for stage, entry in (data.get("stages") or {}).items():
        for group in ("deps", "outs"):
            for item in entry.get(group) or []:
                rows.append([f"{stage} {group[:-1]}: {item.get('path')}", item.get("md5") or item.get("hash") or "–"])
    return rows


def path_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's (relative name, bytes) pairs in sorted order."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(os.fsencode(f.relative_to(path) if f != path else f.name))
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def computed_hashes(paths: list[str]) -> list[list[str]]:
    return [[p, f"sha256:{path_hash(Path(p))}" if Path(p).exists() else "missing"] for p in paths]


def build(params: R.ReportParams, params_path: str | Path = "params.yaml") -> list[R.Block]:
    ev = read_json(params.eval, required=True)
    assert ev is not None
    try:
        blocks = R.main_section(ev) + R.per_task_section(ev)
    except (KeyError, TypeError) as exc:
        raise DigiqError(f"unexpected layout ({type(exc).__name__}: {exc})", file=params.eval) from None
    except DigiqError as exc:
        raise DigiqError(exc.message, file=params.eval, field=exc.field) from None
    exps, why = experiments() if params.experiments else (None, "disabled (report.experiments: false)")
    blocks += R.ablation_section(exps, why)
    blocks += R.label_section(read_json(params.label), params.label)
    blocks += R.critic_section(read_json(params.critic), params.critic, R.live_choosers(ev))
    blocks += R.checks_section(check_results(params.checks), params.checks)
    hashes = lock_hashes(params.lock)
    source = f"from {params.lock}" if hashes is not None else f"{params.lock} absent; sha256 computed now"
    if hashes is None:
        hashes = computed_hashes([str(params_path), params.eval, *params.hash_paths])
    text = Path(params_path).read_text() if Path(params_path).exists() else None
    return blocks + R.provenance_section(text, hashes, source)


def run(params: Params, *, progress: bool = False, params_path: str | Path = "params.yaml") -> tuple[Path, Path]:
    """Write both reports (atomically) from the ``report`` section's inputs, quoting the file ``params_path``;
    nothing is written when eval.json is missing or malformed. (No loop long enough for a progress bar.)"""
    settings = params.report
    blocks = build(settings, params_path)
    write_text(settings.out_md, R.render_markdown(TITLE, blocks))
    write_text(settings.out_html, R.render_html(TITLE, blocks))
    return Path(settings.out_md), Path(settings.out_html)
