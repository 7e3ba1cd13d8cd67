"""The ``local`` executor: worker processes of this machine, one browser each (:mod:`digiq.envs.workers`).

A worker whose process died or that has sent nothing for ``hang_timeout_s`` is killed with its browser (its own
process group) and restarted, and its unit handed out again. Workers are started with ``spawn``, ask the kernel to
SIGTERM them when the parent dies (``PR_SET_PDEATHSIG``), and close their browser on the way out.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from digiq.envs.browser_cleanup import end_orphan_browsers, remove_profiles_of, wait_for_exit
from digiq.envs.workers import Events, RunConfig, Unit, UnitResult, UnitRunner, next_unit
from digiq.errors import DigiqError

_PR_SET_PDEATHSIG = 1


class LocalPool:
    """Worker processes of this machine; each talks to the parent over its own pipe, so killing a worker cannot
    corrupt another's channel."""

    def __init__(self, workers: int):
        self.workers = workers

    def run(self, units: list[Unit], config: RunConfig, events: Events) -> None:
        end_orphan_browsers()  # left by workers of a run that was killed
        pool = _Pool(config, self.workers, events)
        try:
            pool.run(units)
        except BaseException:  # Ctrl-C or a failed unit: stop the workers now, their browsers with them
            pool.stop()
            raise
        pool.shutdown()


class _Pool:
    def __init__(self, config: RunConfig, n: int, events: Events):
        self.config = config
        self.events = events
        self.ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.pipes: dict[int, Any] = {}
        self.busy: dict[int, Unit] = {}
        self.last_task: dict[int, str | None] = {}
        self.seen: dict[int, float] = {}
        for wid in range(n):
            self._start(wid)

    def _start(self, wid: int) -> None:
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(wid, self.config, child_end), name=f"digiq-rollout-{wid}", daemon=True)
        proc.start()
        child_end.close()
        self.procs[wid], self.pipes[wid] = proc, parent_end
        self.last_task[wid] = None
        self.seen[wid] = time.monotonic()

    def run(self, units: list[Unit]) -> None:
        todo = list(units)
        attempts: dict[str, int] = {}
        while todo or self.busy:
            self._assign(todo)
            for conn in mp_connection.wait(list(self.pipes.values()), timeout=0.5):
                try:
                    event = conn.recv()
                except (EOFError, OSError):  # the worker is gone; _stuck() notices and restarts it
                    continue
                self._handle(event)
            for wid in self._stuck():
                unit = self.busy.pop(wid)
                attempts[unit.key] = attempts.get(unit.key, 0) + 1
                code = self.procs[wid].exitcode
                why = f"worker exited with code {code}" if code is not None else f"worker silent for {self.config.hang_timeout_s:g} s"
                if attempts[unit.key] > self.config.unit_retries:
                    raise DigiqError(f"unit {unit.key} failed {attempts[unit.key]} times (last: {why})", field="collect")
                self.events.restart(f"{unit.key}: {why}; restarted it")
                self._restart(wid)
                todo.insert(0, unit)

    def _assign(self, todo: list[Unit]) -> None:
        for wid in self.procs:
            if wid in self.busy or not todo:
                continue
            if not self.procs[wid].is_alive():  # died while idle: replace it before handing it work
                self._restart(wid)
            unit = next_unit(todo, self.last_task[wid])
            self.busy[wid] = unit
            self.last_task[wid] = unit.task
            self.seen[wid] = time.monotonic()
            self.pipes[wid].send(unit)

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind, wid = event[0], event[1]
        self.seen[wid] = time.monotonic()
        if kind == "step":
            self.events.step()
        elif kind == "episode":
            self.events.episode(event[2])
        elif kind == "unit":
            result: UnitResult = event[2]
            if wid in self.busy and self.busy[wid].key == result.key:
                self.events.on_unit(self.busy.pop(wid), result)
        elif kind == "error":
            raise DigiqError(f"worker {wid}: {event[2]}", field="collect")

    def _stuck(self) -> list[int]:
        now = time.monotonic()
        return [
            wid
            for wid in list(self.busy)
            if not self.procs[wid].is_alive() or now - self.seen[wid] > self.config.hang_timeout_s
        ]

    def _restart(self, wid: int) -> None:
        _kill_group(self.procs[wid])
        self.pipes[wid].close()
        self._start(wid)

    def stop(self) -> None:
        """SIGTERM every worker (each closes its browser on the way out); SIGKILL their groups after 10 s."""
        for proc in self.procs.values():
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            _kill_group(proc)

    def shutdown(self) -> None:
        """Ask idle workers to finish (they close their browsers); kill any that do not within 30 s."""
        for wid, conn in self.pipes.items():
            if self.procs[wid].is_alive():
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                _kill_group(proc)


def _kill_group(proc: Any) -> None:
    """SIGKILL a worker and everything in its process group (its chromedriver and Chromium)."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.join(timeout=10)
    remove_profiles_of(proc.pid)


# --- inside a worker process ---------------------------------------------------------------------


def _worker_main(wid: int, config: RunConfig, conn: Any) -> None:
    os.setpgrp()  # own process group: the parent can kill this worker with its browser in one call
    _die_with_parent()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    runner: UnitRunner | None = None
    try:
        runner = UnitRunner(config)
        while True:
            unit = conn.recv()
            if unit is None:
                return
            result = runner.run_unit(unit, on_step=lambda: conn.send(("step", wid)),
                                     on_episode=lambda summary: conn.send(("episode", wid, summary)))
            conn.send(("unit", wid, result))
    except (SystemExit, EOFError, BrokenPipeError):
        pass
    except DigiqError as exc:
        conn.send(("error", wid, str(exc)))
    except Exception:  # a bug, not a browser failure: report it instead of restarting forever
        conn.send(("error", wid, traceback.format_exc(limit=-3).strip().replace("\n", " | ")))
    finally:
        if runner is not None:
            runner.close()
        end_own_browsers()


def end_own_browsers() -> None:
    """Kill whatever is left in this worker's process group (a browser being started when SIGTERM came)."""
    me, group = os.getpid(), os.getpgrp()
    killed = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, pgid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[2])
            if pgid == group and pid != me:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
            continue
    wait_for_exit(killed, timeout_s=5.0)
    remove_profiles_of(me)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's shutdown still stops workers
        pass
    if os.getppid() == 1:  # the parent died before the request took effect
        raise SystemExit(0)


def _exit_on_signal(signum: int, frame: Any) -> None:
    # More SIGTERMs can follow (the kernel re-sends the parent-death signal when the orphan is
    # re-parented, more than once per worker: docs/benchmarks.md): ignore them, or they cut the browser cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)
