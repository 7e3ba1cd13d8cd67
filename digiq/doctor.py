"""`digiq doctor`: is this machine and this project ready to run the DAG? One check per line, with the fix.

Each check returns a :class:`Finding` — ``ok``, ``warn`` (works, but slower or stale) or ``fail`` (a stage will
stop) — with what was found and, when not ok, what to do. Checks never raise: a check that crashes is itself
reported as a failure naming the exception.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "fail"]
MIN_FREE_GIB = 5.0  # the default DAG writes ~1.5 GiB (screenshots, embeddings, models) plus DVC's cache copies
MAKE_SETUP = "run `make setup` (Debian's chromium + chromium-driver, the .venv)"


@dataclass
class Finding:
    name: str
    status: Status
    detail: str
    fix: str = ""


def check_python() -> Finding:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] == (3, 11):
        return Finding("python", "ok", version)
    return Finding("python", "warn", f"{version} (digiq is built and tested on 3.11)", "use python3.11 for .venv")


def check_torch() -> Finding:
    import torch

    from digiq.runtime import choose_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    detail = (f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
              f"compute dtype {str(choose_dtype(device)).removeprefix('torch.')}")
    if device == "cpu" and "+cu" in torch.__version__:
        return Finding("torch", "warn", detail + " (a CUDA build on a machine without a GPU)",
                       "pip install torch==2.13.0 (the CPU wheel) before the project")
    return Finding("torch", "ok", detail)


def _version_of(executable: str) -> str:
    out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def check_browser_binaries() -> Finding:
    from digiq.envs.miniwob import BrowserConfig

    browser = BrowserConfig()
    missing = [p for p in (browser.binary, browser.driver) if not (Path(p).is_file() and os.access(p, os.X_OK))]
    if missing:
        return Finding("chromium", "fail", f"not executable: {', '.join(missing)}", MAKE_SETUP +
                       " or set MINIWOB_CHROME_BINARY / MINIWOB_CHROMEDRIVER")
    chromium, driver = (" ".join(_version_of(p).split()[:2]) for p in (browser.binary, browser.driver))
    major = [v.split()[1].split(".")[0] if len(v.split()) > 1 else "?" for v in (chromium, driver)]
    if major[0] != major[1]:
        return Finding("chromium", "fail", f"{chromium} with {driver}: major versions differ",
                       "install matching chromium and chromium-driver from the same Debian release")
    return Finding("chromium", "ok", f"{chromium}; {driver}")


def check_headless_start() -> Finding:
    """One MiniWoB episode reset in headless Chromium (the browser is always closed)."""
    from digiq.envs.miniwob import MiniWoBEnv

    with MiniWoBEnv("click-button") as env:
        obs = env.reset(seed=0)
    return Finding("headless browser", "ok", f"MiniWoB click-button started, screenshot {obs.screenshot.shape[1]}×"
                   f"{obs.screenshot.shape[0]}")


def check_disk(root: Path) -> Finding:
    free = shutil.disk_usage(root).free / 2**30
    if free < MIN_FREE_GIB:
        return Finding("disk", "warn", f"{free:.1f} GiB free at {root}", f"free at least {MIN_FREE_GIB:.0f} GiB "
                       "(`dvc gc -w` drops cached outputs no longer used)")
    return Finding("disk", "ok", f"{free:.1f} GiB free at {root}")


def check_params(path: Path) -> Finding:
    from digiq.params_file import load_params
    from digiq.errors import DigiqError

    if not path.is_file():
        return Finding("params", "warn", f"{path} not found: every default applies", "run digiq from the repo root")
    try:
        load_params(path)
    except DigiqError as exc:
        return Finding("params", "fail", str(exc), f"fix {path} (every key is documented in it)")
    return Finding("params", "ok", f"{path} valid")


def check_feature_store(root: Path, params_path: Path) -> Finding:
    from digiq.params_file import load_params
    from digiq.errors import DigiqError
    from digiq.store_client import open_store

    try:
        variant = load_params(params_path).features.variant
    except DigiqError:  # reported by check_params
        variant = "finetuned"
    repo = root / "features"
    try:
        store = open_store(repo, variant)
        views = sorted(v.name for v in store.list_feature_views())
    except DigiqError as exc:
        return Finding("feature store", "warn", str(exc), "`dvc repro features` (or `digiq features materialize`)")
    return Finding("feature store", "ok", f"variant {variant}: {len(views)} feature views ({', '.join(views)})")


def check_dvc(root: Path) -> Finding:
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    out = subprocess.run([dvc, "status", "--json"], cwd=root, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return Finding("dvc", "fail", (out.stderr or out.stdout).strip().splitlines()[-1:][0] if (out.stderr or out.stdout).strip()
                       else f"dvc status exited {out.returncode}", "run from the repo root (a git clone with dvc.yaml)")
    stale = sorted(json.loads(out.stdout or "{}"))
    if stale:
        shown = ", ".join(stale[:6]) + (f" … (+{len(stale) - 6})" if len(stale) > 6 else "")
        return Finding("dvc", "warn", f"{len(stale)} stage(s) not up to date: {shown}", "`make repro` (or `dvc repro`)")
    return Finding("dvc", "ok", "every stage up to date")


def run_checks(root: Path, params_path: Path, *, browser: bool = True) -> list[Finding]:
    checks: list[tuple[str, Callable[[], Finding]]] = [
        ("python", check_python), ("torch", check_torch), ("chromium", check_browser_binaries),
        ("disk", lambda: check_disk(root)), ("params", lambda: check_params(params_path)),
        ("feature store", lambda: check_feature_store(root, params_path)), ("dvc", lambda: check_dvc(root)),
    ]
    findings = []
    for name, check in checks:
        findings.append(_guarded(name, check))
        if name == "chromium" and browser and findings[-1].status == "ok":
            findings.append(_guarded("headless browser", check_headless_start))
    return findings


def _guarded(name: str, check: Callable[[], Finding]) -> Finding:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a doctor reports every failure instead of stopping at the first
        return Finding(name, "fail", f"{type(exc).__name__}: {exc}".splitlines()[0], MAKE_SETUP)


def as_json(findings: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings], indent=2)
