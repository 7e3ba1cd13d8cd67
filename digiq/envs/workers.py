"""Rollout workers: one process and one browser each, running blocks of episodes ("units").

The parent hands units to workers, counts their steps for the progress bar, and watches them: a worker
whose process died or that has sent nothing for ``hang_timeout_s`` is killed together with its browser
(its own process group) and restarted, and its unit is handed out again. Inside a worker, a browser
error during an episode closes the browser, starts a new one and replays the episode from its seed.

When the run has a ``Recording``, a unit with a ``shard`` name is recorded: its trajectories are written as
that shard of the dataset (atomically, when the whole unit is done), so an interrupted run loses at most the
units in flight and a re-run skips every shard already on disk. Episodes depend only on (task, episode seed), never on which
worker ran them or in what order.

Workers are started with the ``spawn`` method, ask the kernel to SIGTERM them when the parent dies
(``PR_SET_PDEATHSIG``), and close their browser on the way out.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digiq.envs.browser_cleanup import remove_profiles_of, sweep_stale_profiles, wait_for_exit
from digiq.envs.miniwob import BrowserConfig, BrowserError, MiniWoBEnv
from digiq.envs.policy import PolicySpec
from digiq.envs.rollout import episode_seed, run_episode, to_trajectory, trajectory_id
from digiq.errors import DigiqError

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Unit:
    """A block of episodes of one task; ``shard`` names the dataset shard it becomes (None: not recorded)."""

    task: str
    indices: tuple[int, ...]
    shard: str | None = None

    @property
    def key(self) -> str:
        return self.shard or f"{self.task}[{self.indices[0]}:{self.indices[-1] + 1}]"


def episode_blocks(episodes: int, size: int) -> list[tuple[int, ...]]:
    """Episode indices 0 … episodes-1 in consecutive blocks of ``size`` (the last one may be shorter)."""
    return [tuple(range(start, min(start + size, episodes))) for start in range(0, episodes, size)]


@dataclass(frozen=True)
class Recording:
    """Where recorded units are written: a dataset folder, with the γ of its returns and its source name."""

    dataset: str
    gamma: float
    source: str


@dataclass(frozen=True)
class RunConfig:
    """Everything a worker needs (picklable)."""

    policy: PolicySpec
    seed: int  # base seed: episode e of task t uses episode_seed(seed, t, e)
    max_steps: int
    history: int = 1  # previous actions shown in the observation text
    browser: BrowserConfig = field(default_factory=BrowserConfig)
    record: Recording | None = None  # None: episodes are only summarised, units with a shard name are not written
    episode_retries: int = 3  # browser restarts per episode before the unit fails
    hang_timeout_s: float = 120.0  # silence after which the parent kills and restarts a worker
    unit_retries: int = 3  # worker restarts per unit before the run fails


def run_units(
    units: list[Unit],
    config: RunConfig,
    workers: int,
    on_step: Callable[[], None] | None = None,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    on_restart: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every unit on ``workers`` processes; return the episode summaries (sorted by task, index).

    ``on_restart(reason)`` is called whenever a dead or silent worker is replaced.
    """
    if not units:
        return []
    sweep_stale_profiles()  # left by workers of a run that was killed while starting a browser
    pool = _Pool(config, min(workers, len(units)), on_step, on_episode, on_restart)
    try:
        summaries = pool.run(units)
    except BaseException:  # Ctrl-C or a failed unit: stop the workers now, their browsers with them
        pool.stop()
        raise
    pool.shutdown()
    return summaries


class _Pool:
    """Workers talk to the parent over one pipe each, so killing a worker cannot corrupt another's channel."""

    def __init__(self, config: RunConfig, n: int, on_step: Callable[[], None] | None,
                 on_episode: Callable[[dict[str, Any]], None] | None, on_restart: Callable[[str], None] | None):
        self.config = config
        self.on_restart = on_restart
        self.ctx = mp.get_context("spawn")
        self.on_step = on_step
        self.on_episode = on_episode
        self.procs: dict[int, Any] = {}
        self.pipes: dict[int, Any] = {}
        self.busy: dict[int, Unit] = {}
        self.last_task: dict[int, str | None] = {}
        self.seen: dict[int, float] = {}
        self.pending_episodes: dict[int, list[dict[str, Any]]] = {}
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

    def run(self, units: list[Unit]) -> list[dict[str, Any]]:
        todo = list(units)
        attempts: dict[str, int] = {}
        summaries: list[dict[str, Any]] = []
        while todo or self.busy:
            self._assign(todo)
            for conn in mp_connection.wait(list(self.pipes.values()), timeout=0.5):
                try:
                    event = conn.recv()
                except (EOFError, OSError):  # the worker is gone; _stuck() notices and restarts it
                    continue
                self._handle(event, summaries)
            for wid in self._stuck():
                unit = self.busy.pop(wid)
                attempts[unit.key] = attempts.get(unit.key, 0) + 1
                code = self.procs[wid].exitcode
                why = f"worker exited with code {code}" if code is not None else f"worker silent for {self.config.hang_timeout_s:g} s"
                if attempts[unit.key] > self.config.unit_retries:
                    raise DigiqError(f"unit {unit.key} failed {attempts[unit.key]} times (last: {why})", field="collect")
                if self.on_restart is not None:
                    self.on_restart(f"{unit.key}: {why}; restarted it")
                self._restart(wid)
                todo.insert(0, unit)
        return sorted(summaries, key=lambda s: (s["task"], s["index"]))

    def _assign(self, todo: list[Unit]) -> None:
        for wid in self.procs:
            if wid in self.busy or not todo:
                continue
            if not self.procs[wid].is_alive():  # died while idle: replace it before handing it work
                self._restart(wid)
            # keep a worker on its current task while there is work for it (no browser restart)
            pick = next((i for i, u in enumerate(todo) if u.task == self.last_task[wid]), 0)
            unit = todo.pop(pick)
            self.busy[wid] = unit
            self.last_task[wid] = unit.task
            self.seen[wid] = time.monotonic()
            self.pending_episodes[wid] = []
            self.pipes[wid].send(unit)

    def _handle(self, event: tuple[Any, ...], summaries: list[dict[str, Any]]) -> None:
        kind, wid = event[0], event[1]
        self.seen[wid] = time.monotonic()
        if kind == "step":
            if self.on_step is not None:
                self.on_step()
        elif kind == "episode":
            self.pending_episodes.setdefault(wid, []).append(event[2])
            if self.on_episode is not None:
                self.on_episode(event[2])
        elif kind == "unit":
            if wid in self.busy and self.busy[wid].key == event[2]:
                del self.busy[wid]
                summaries.extend(self.pending_episodes.pop(wid, []))
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
        self.pending_episodes.pop(wid, None)
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
    worker: _Worker | None = None
    try:
        worker = _Worker(wid, config, conn)
        while True:
            unit = conn.recv()
            if unit is None:
                return
            worker.run_unit(unit)
    except (SystemExit, EOFError, BrokenPipeError):
        pass
    except DigiqError as exc:
        conn.send(("error", wid, str(exc)))
    except Exception:  # a bug, not a browser failure: report it instead of restarting forever
        conn.send(("error", wid, traceback.format_exc(limit=-3).strip().replace("\n", " | ")))
    finally:
        if worker is not None:
            worker.close()
        _end_own_browsers()


def _end_own_browsers() -> None:
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


class _Worker:
    def __init__(self, wid: int, config: RunConfig, conn: Any):
        self.wid = wid
        self.config = config
        self.conn = conn
        self.policy = config.policy.build()
        self.env: MiniWoBEnv | None = None
        self.writer = None
        if config.record is not None:
            from digiq.store import DatasetWriter

            self.writer = DatasetWriter(config.record.dataset, gamma=config.record.gamma, source=config.record.source)

    def run_unit(self, unit: Unit) -> None:
        trajectories = []
        for index in unit.indices:
            episode = self._episode_with_retries(unit.task, index)
            self.conn.send(("episode", self.wid, episode.summary()))
            if self.writer is not None:
                trajectories.append(to_trajectory(episode, self.writer.put_image, trajectory_id(unit.task, self.config.seed, index)))
        if self.writer is not None and unit.shard is not None:
            self.writer.write_shard(unit.shard, trajectories)
        self.conn.send(("unit", self.wid, unit.key))

    def _episode_with_retries(self, task: str, index: int):
        seed = episode_seed(self.config.seed, task, index)
        for attempt in range(self.config.episode_retries + 1):
            try:
                env = self._env(task)
                episode = run_episode(env, self.policy, index=index, seed=seed, max_steps=self.config.max_steps,
                                      history=self.config.history, on_step=self._step_event)
                episode.retries = attempt
                return episode
            except BrowserError as exc:
                self.close()
                if attempt == self.config.episode_retries:
                    raise DigiqError(f"{task} episode {index}: browser failed {attempt + 1} times ({exc})", field="collect") from None
        raise AssertionError("unreachable")

    def _env(self, task: str) -> MiniWoBEnv:
        if self.env is not None and self.env.task != task:
            self.close()
        if self.env is None:
            self.env = MiniWoBEnv(task, self.config.browser, final_screenshot=self.writer is not None)
        return self.env

    def _step_event(self) -> None:
        self.conn.send(("step", self.wid))

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            try:
                env.close()
            except Exception:  # a dead browser may fail to quit; its process group is still ours
                pass

