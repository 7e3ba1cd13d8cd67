"""Cleaning up after MiniWoB browsers: Chromium and chromedriver processes left running, temporary profiles left on disk.

Every browser gets a fresh profile folder ``<temp>/digiq-chromium-<owner pid>-*``; the processes running on a
profile are found by their command line (``--user-data-dir=<profile>``), so a crashed driver's Chromium, or the
browsers of a killed worker or Ray actor, can be ended and their profiles deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

PROFILE_PREFIX = "digiq-chromium-"  # + owner pid: fresh Chromium profiles under the temp folder


def kill_profile_processes(profile_dir: str) -> list[int]:
    """SIGKILL the processes whose command line names this Chromium profile; return their pids."""
    import signal

    marker = f"--user-data-dir={profile_dir}".encode()
    killed = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().split(b"\0"):
                pid = int(cmdline.parent.name)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    wait_for_exit(killed, timeout_s=5.0)
    return killed


def remove_profiles_of(pid: int) -> None:
    """Delete the Chromium profiles a (killed) process left behind, and anything still running on them."""
    for path in Path(tempfile.gettempdir()).glob(f"{PROFILE_PREFIX}{pid}-*"):
        kill_profile_processes(str(path))
        shutil.rmtree(path, ignore_errors=True)


def end_orphan_browsers() -> list[Path]:
    """End the browsers whose owner process is gone (a worker or Ray actor killed, or lost with its raylet) and delete
    their profiles; return the profiles. Owners lead their own process group, so their chromedriver goes too.
    Profiles live in this host's temp folder: the owner's pid is checked on the host that started it."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{PROFILE_PREFIX}*-*"):
        owner = path.name[len(PROFILE_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            _kill_group(int(owner))
            kill_profile_processes(str(path))
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _kill_group(pgid: int) -> None:
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_cmdline(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""


def wait_for_exit(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """Wait until the given processes are gone; return those still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            time.sleep(0.05)
    return alive


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return status != "Z"
