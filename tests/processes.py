"""Helpers for tests that run `digiq <stage>` in its own process and SIGKILL it: the stage process, kill
points, and the Chromium processes a stage may leave behind.

Stage processes come from a multiprocessing fork server that has imported torch, transformers, Feast and the
CLI once, so each start costs milliseconds instead of those imports (docs/benchmarks.md); the child runs the real
`digiq` Typer app with the given arguments, and is a plain process to SIGKILL.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

PRELOAD = ["torch", "transformers", "peft", "sklearn.linear_model", "dvclive", "feast", "digiq.cli.main"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _cli_main(argv: list[str], log: str, env: dict[str, str]) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update({"DIGIQ_THREADS": "1", **env})  # tiny models: one thread each, no spin-waiting under load
    from digiq.cli.main import app

    app(args=argv, prog_name="digiq")


def start_stage(argv: list[str], log: Path, env: dict[str, str] | None = None) -> multiprocessing.Process:
    """`digiq ARGV` in a new process (stdout and stderr appended to ``log``)."""
    proc = _forkserver().Process(target=_cli_main, args=(argv, str(log), env or {}), daemon=False)
    proc.start()
    return proc


def run_stage(argv: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300) -> None:
    """`digiq ARGV` to completion; fails the test with the log's tail when it exits non-zero."""
    proc = start_stage(argv, log, env)
    proc.join(timeout)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert proc.exitcode == 0, f"digiq {' '.join(argv[:1])} exited {proc.exitcode}:\n{log.read_text()[-4000:]}"


def kill_at(proc: multiprocessing.Process, progress: Callable[[], int], events: int, delay: float,
            timeout: float = 300) -> int:
    """SIGKILL ``proc`` ``delay`` s after ``progress()`` reaches ``events``, or at event ``events + 1`` if that comes
    first; fail if the stage ends before. Returns progress().

    Cutting the delay short at the next event keeps the kill inside the work still to do however fast the machine
    runs the stage: a kill point is "after event k, before event k + 2", never "k events plus a wall-clock time"."""
    deadline = time.monotonic() + timeout
    while progress() < events:
        assert proc.is_alive(), f"the stage ended (exit {proc.exitcode}) before {events} progress events"
        assert time.monotonic() < deadline, f"no {events} progress events in {timeout} s"
        time.sleep(0.003)
    end = time.monotonic() + delay
    while time.monotonic() < end and progress() <= events:
        time.sleep(0.003)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, f"the stage finished (exit {proc.exitcode}) before the kill point"
    return progress()


class Files:
    """Progress as the number of files matching ``pattern`` under ``root`` (chunks, shards: each written atomically)
    that were not there when this watcher was made."""

    def __init__(self, root: Path, pattern: str):
        self.root, self.pattern = root, pattern
        self.before = set(root.glob(pattern))

    def __call__(self) -> int:
        return len(set(self.root.glob(self.pattern)) - self.before)


class Replacements:
    """Progress as the number of times ``path`` was replaced (atomic rename: new inode) since this watcher was made.

    Polling sees every replacement only when calls come faster than the writes (checkpoints: tens of ms apart)."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0
        self.seen = self._key()

    def _key(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def __call__(self) -> int:
        key = self._key()
        if key is not None and key != self.seen:
            self.seen, self.count = key, self.count + 1
        return self.count


def temp_files(root: Path) -> list[Path]:
    """What atomic writes leave when killed (``.<name>.<pid>@<host>.<random>.tmp``), anywhere under ``root``."""
    return sorted(p for p in root.rglob(".*.tmp"))


def browsers() -> list[Path]:
    """Chromium processes started by digiq (their profile folder is named digiq-chromium-*)."""
    return [p for p in Path("/proc").glob("[0-9]*/cmdline") if b"digiq-chromium-" in _read(p)]


def wait_for_no_browsers(timeout: float = 30) -> list[Path]:
    """Wait until no digiq browser runs (rollout workers follow their parent's death and close theirs); the rest."""
    deadline = time.monotonic() + timeout
    while browsers() and time.monotonic() < deadline:
        time.sleep(0.2)
    return browsers()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""


def digiq_executable() -> str:
    return str(Path(sys.executable).parent / "digiq")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, hidden ones included (what DVC hashes as a stage's output)."""
    return {f.relative_to(root).as_posix(): sha256(f) for f in sorted(root.rglob("*")) if f.is_file()}
