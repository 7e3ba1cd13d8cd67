"""Rollout workers: one browser each, running blocks of episodes ("units"), under an executor that hands them out.

Executors (one contract, :class:`Executor`): ``local``, worker processes of this machine (:class:`LocalPool`), and
``ray``, one Ray actor per browser on a cluster (:mod:`digiq.ray_executor`). Both run a :class:`UnitRunner` on each
unit and hand its :class:`UnitResult` to the driver (this process), which commits a unit with a ``shard`` name in a
run with a ``Recording``: its screenshots, then the shard (atomically: the commit point). An interrupted run loses at
most the units in flight; a re-run skips every shard on disk. Episodes depend only on (task, episode seed), never on
the worker, host or executor that ran them, nor on the order.

A browser error during an episode closes the browser, starts a new one and replays the episode from its seed. The
local pool's worker processes: :mod:`digiq.envs.local_pool`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from digiq.envs.miniwob import BrowserConfig, BrowserError, MiniWoBEnv
from digiq.envs.policy import Policy, PolicySpec
from digiq.envs.replay import ReplayingEnv
from digiq.envs.rollout import Episode, episode_seed, run_episode, to_trajectory, trajectory_id
from digiq.errors import DigiqError

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
        from digiq.envs.local_pool import LocalPool

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
