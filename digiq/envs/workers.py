"""Rollout workers: one browser each, running blocks of episodes ("units"), under an executor that hands them out.

Executors (one contract, :class:`Executor`): ``local``, worker processes of this machine (:class:`LocalPool`), and
``ray``, one Ray actor per browser on a cluster (:mod:`digiq.ray_executor`). Both run a :class:`UnitRunner` on each
unit and hand its :class:`UnitResult` to the driver (this process), which commits a unit with a ``shard`` name in a
run with a ``Recording``: its screenshots, then the shard (atomically: the commit point). An interrupted run loses at
most the units in flight; a re-run skips every shard on disk. Episodes depend only on (task, episode seed), never on
the worker, host or executor that ran them, nor on the order.

Local pool: a worker whose process died or that has sent nothing for ``hang_timeout_s`` is killed with its browser
(its own process group) and restarted, and its unit handed out again; a browser error during an episode closes the
browser, starts a new one and replays the episode from its seed. Workers are started with ``spawn``, ask the kernel
to SIGTERM them when the parent dies (``PR_SET_PDEATHSIG``), and close their browser on the way out.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from digiq.envs.browser_cleanup import end_orphan_browsers, remove_profiles_of, wait_for_exit
from digiq.envs.miniwob import BrowserConfig, BrowserError, MiniWoBEnv
from digiq.envs.policy import Policy, PolicySpec
from digiq.envs.replay import ReplayingEnv
from digiq.envs.rollout import Episode, episode_seed, run_episode, to_trajectory, trajectory_id
from digiq.errors import DigiqError

_PR_SET_PDEATHSIG = 1
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Unit:
    """A block of episodes of one task; ``shard`` names the dataset shard it becomes (None: not recorded). With
    ``runs``, every episode is played by each of those policies, one after the other in one browser, so that what they
    share of an episode is played once (:mod:`digiq.envs.replay`)."""

    task: str
    indices: tuple[int, ...]
    shard: str | None = None
    runs: tuple[str, ...] = ()  # names of RunConfig.policies that play each episode in turn (empty: RunConfig.policy)

    @property
    def key(self) -> str:
        block = self.shard or f"{self.task}[{self.indices[0]}:{self.indices[-1] + 1}]"
        return f"{block} {','.join(self.runs)}" if self.runs else block


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
    unit_retries: int = 3  # worker restarts per unit before the run fails (Ray: actor restarts and task retries)
    feature_server: dict[str, Any] | None = None  # Ray: {features, cache} of the live featurizer one model per node serves
    policies: tuple[tuple[str, PolicySpec], ...] = ()  # named policies that units with ``runs`` play
    reuse: bool = True  # the policies of a unit's runs share what their episodes have in common (digiq.envs.replay)

    def spec(self, run: str) -> PolicySpec:
        """The policy of ``run`` ("": ``policy``)."""
        if not run:
            return self.policy
        named = dict(self.policies)
        if run not in named:
            raise DigiqError(f"unit run {run!r} names no policy (known: {', '.join(named) or 'none'})", field="runs")
        return named[run]


@dataclass
class UnitResult:
    """A finished unit as a worker hands it to the driver: its episode summaries, the worker that ran it
    (``host:pid``), and for a recorded unit its trajectories and the PNG bytes their steps name."""

    key: str
    summaries: list[dict[str, Any]]
    worker: str
    trajectories: list[Any] = field(default_factory=list)  # digiq.schema.Trajectory
    images: dict[str, bytes] = field(default_factory=dict)  # relative path in the dataset -> PNG


def _nothing(*args: Any) -> None:
    return None


@dataclass
class Events:
    """What an executor tells the driver: steps and episodes as they happen (progress), worker restarts, finished units."""

    on_unit: Callable[[Unit, UnitResult], None]
    step: Callable[[], None] = _nothing
    episode: Callable[[dict[str, Any]], None] = _nothing
    restart: Callable[[str], None] = _nothing


class Executor(Protocol):
    """Runs every unit on ``workers`` browsers, each unit whole on one of them, and reports through ``events``."""

    def run(self, units: list[Unit], config: RunConfig, events: Events) -> None: ...


def run_units(
    units: list[Unit],
    config: RunConfig,
    workers: int,
    on_step: Callable[[], None] | None = None,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    on_restart: Callable[[str], None] | None = None,
    executor: str = "local",
) -> list[dict[str, Any]]:
    """Run every unit on ``workers`` browsers of ``executor`` ("local" or "ray"), committing recorded units as they
    finish; return the episode summaries (sorted by task, index). ``on_restart(reason)``: a worker was replaced."""
    if not units:
        return []
    commit = ShardCommitter(config.record)
    summaries: list[dict[str, Any]] = []

    def finished(unit: Unit, result: UnitResult) -> None:
        commit(unit, result)
        summaries.extend(result.summaries)

    events = Events(finished, on_step or _nothing, on_episode or _nothing, on_restart or _nothing)
    make_executor(executor, min(workers, len(units))).run(units, config, events)
    return sorted(summaries, key=lambda s: (s["task"], s["index"]))


def make_executor(name: str, workers: int) -> Executor:
    """The executor called ``name`` with ``workers`` browsers; ``ray`` needs the ``digiq[ray]`` extra."""
    if name == "local":
        return LocalPool(workers)
    if name == "ray":
        from digiq.ray_executor import RayExecutor

        return RayExecutor(workers)
    raise DigiqError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})", field="executor")


class ShardCommitter:
    """The driver's side of recording: a recorded unit's screenshots, then its shard (atomically: the commit point)."""

    def __init__(self, record: Recording | None):
        self.writer = None
        if record is not None:
            from digiq.store import DatasetWriter

            self.writer = DatasetWriter(record.dataset, gamma=record.gamma, source=record.source)

    def __call__(self, unit: Unit, result: UnitResult) -> None:
        if self.writer is None or unit.shard is None:
            return
        for rel, data in result.images.items():
            if self.writer.put_image(data)[0] != rel:
                raise DigiqError(f"screenshot {rel} arrived changed from worker {result.worker}", field="collect")
        self.writer.write_shard(unit.shard, result.trajectories)


def next_unit(todo: list[Unit], last_task: str | None) -> Unit:
    """The next unit for a worker: one of its current task while there is one (no browser restart), else the first."""
    return todo.pop(next((i for i, u in enumerate(todo) if u.task == last_task), 0))


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


class _PngBuffer:
    """``put_image`` for a worker: the PNG under the name the dataset gives it, kept for the driver to write."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}

    def put_image(self, image: Any) -> tuple[str, str]:
        from digiq.store import SCREENSHOTS_DIR, encode_png, sha256_bytes

        data = encode_png(image)
        digest = sha256_bytes(data)
        rel = f"{SCREENSHOTS_DIR}/{digest[:2]}/{digest}.png"
        self.images[rel] = data
        return rel, digest


class UnitRunner:
    """Policies (built when first needed) and one browser (restarted on a browser error) running whole units: a local
    worker's or a Ray actor's."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.policies: dict[str, Policy] = {}
        self.env: MiniWoBEnv | None = None
        self.replay = ReplayingEnv(reuse=config.reuse)

    def policy(self, run: str = "") -> Policy:
        if run not in self.policies:
            self.policies[run] = self.config.spec(run).build()
        return self.policies[run]

    def run_unit(self, unit: Unit, on_step: Callable[[], None] | None = None,
                 on_episode: Callable[[dict[str, Any]], None] | None = None) -> UnitResult:
        recorded = self.config.record is not None and unit.shard is not None
        result = UnitResult(unit.key, [], f"{socket.gethostname()}:{os.getpid()}")
        images = _PngBuffer()
        for index in unit.indices:
            for run in unit.runs or ("",):
                episode, cost = self._episode_with_retries(unit.task, index, run, on_step)
                summary = episode.summary() | ({"run": run, "cost": cost} if run else {})
                result.summaries.append(summary)
                if on_episode is not None:
                    on_episode(summary)
                if recorded:
                    result.trajectories.append(to_trajectory(episode, images.put_image, trajectory_id(unit.task, self.config.seed, index)))
        result.images = images.images
        return result

    def _episode_with_retries(self, task: str, index: int, run: str, on_step: Callable[[], None] | None) -> tuple[Episode, dict[str, Any]]:
        """The episode and what it cost: wall seconds, and where its resets and steps came from (ReplayCounts)."""
        seed = episode_seed(self.config.seed, task, index)
        policy = self.policy(run)
        started, before = time.perf_counter(), self.replay.counts.as_dict()
        for attempt in range(self.config.episode_retries + 1):
            try:
                self.replay.attach(self._env(task))
                episode = run_episode(self.replay, policy, index=index, seed=seed, max_steps=self.config.max_steps,
                                      history=self.config.history, on_step=on_step)
                episode.retries = attempt
                counts = self.replay.counts.as_dict()
                return episode, {"seconds": round(time.perf_counter() - started, 4),
                                 **{k: counts[k] - before[k] for k in counts}}
            except BrowserError as exc:
                self.close()
                if attempt == self.config.episode_retries:
                    raise DigiqError(f"{task} episode {index}: browser failed {attempt + 1} times ({exc})", field="collect") from None
        raise AssertionError("unreachable")

    def _env(self, task: str) -> MiniWoBEnv:
        if self.env is not None and self.env.task != task:
            self.close()
        if self.env is None:
            self.env = MiniWoBEnv(task, self.config.browser, final_screenshot=self.config.record is not None)
        return self.env

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            try:
                env.close()
            except Exception:  # a dead browser may fail to quit; its process group is still ours
                pass
