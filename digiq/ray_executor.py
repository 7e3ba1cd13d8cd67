"""Browser rollouts on Ray: one actor per browser, each running whole units; the driver commits what they return.

    executor: ray      (collect.executor / evaluate.executor, or ``--executor ray``)
    RAY_ADDRESS set    join that cluster (``ray start --head`` on one host, ``ray start --address=…`` on the others)
    RAY_ADDRESS unset  start a Ray on this machine for the run, and shut it down after

Contract: the driver keeps ``workers`` actors busy, one unit in flight per actor (a unit of the task the actor's
browser already shows while there is one), and passes each returned :class:`~digiq.envs.workers.UnitResult` to
the same commit as the local pool (:func:`~digiq.envs.workers.run_units`). Actors are spread over the nodes.

Faults are Ray's to handle, not a watchdog's: an actor whose process is killed, or whose node is lost, is restarted
(``max_restarts``; on another node if its own is gone) and its unit re-run from the start (``max_task_retries``),
``RunConfig.unit_retries`` times each. Ray cannot tell a hung actor from a slow one, so the driver reads each busy
actor's step count every second (progress, and a heartbeat): one that has not moved for ``hang_timeout_s`` is killed
with ``ray.kill(no_restart=False)``, and Ray restarts it and retries its unit as after a crash. A unit's episodes depend only on (task, episode seed), and the driver commits
only returned results, one per unit, so a retried unit is committed once and equals the lost one. A browser crash
inside an actor is handled as in the local pool (the episode is replayed from its seed). A restarted actor first ends
the browsers its dead predecessor left on that host (:func:`~digiq.envs.browser_cleanup.end_orphan_browsers`).
The driver killed and re-run resumes from the committed shards like any run.

Paths in the run configuration (trained models, caches) are read by the actors: the repository must sit at the same
path on every node (a shared folder, or the same checkout with ``dvc pull``); actors start in the driver's folder.

Shared model (``RunConfig.feature_server``, ``evaluate.shared_model``): instead of a live featurizer (the VLM and the
channel models) in every browser actor, one :class:`FeatureServer` per node, pinned there
(``NodeAffinitySchedulingStrategy``, no CPU reserved: it computes while the browsers wait for it). A browser actor's
policy gets a :class:`ServerFeaturizer` that keeps its episode's state (:class:`~digiq.live_features.EpisodeState`)
and sends each step to its node's server; the server collects the requests that arrive within ``wait_s`` (at most
``max_batch``, and whatever queued while the previous batch ran) and computes them in one
:meth:`~digiq.live_features.LiveFeaturizer.batch` call, whose results equal one step at a time's. A server killed is
restarted by Ray and the call retried (featurization is a pure function of the request).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from typing import Any

from digiq.envs.browser_cleanup import end_orphan_browsers
from digiq.envs.policy import PolicySpec
from digiq.envs.workers import Events, RunConfig, Unit, UnitResult, UnitRunner, next_unit
from digiq.errors import DigiqError


def require_ray() -> Any:
    """The ``ray`` module, or one clear error naming the setting that asked for it."""
    try:
        import ray
    except ImportError:
        raise DigiqError("executor 'ray' needs Ray: pip install 'digiq[ray]' (or set executor: local)",
                         field="executor") from None
    return ray


class BrowserActor:
    """A Ray actor's body: one :class:`UnitRunner` (policy and browser), in the driver's folder. It runs with two
    threads, so that :meth:`steps` answers while :meth:`run_unit` plays."""

    def __init__(self, config: RunConfig, folder: str, servers: dict[str, Any] | None = None):
        try:
            os.setpgrp()  # lead a process group: whoever ends orphans later ends this actor's chromedriver with it
        except OSError:  # already a session leader: its group is its own
            pass
        end_orphan_browsers()
        if os.path.isdir(folder):
            os.chdir(folder)
        self.runner = UnitRunner(with_server(config, servers) if servers else config)
        self.done_steps = 0

    def name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def steps(self) -> int:
        """Steps played since this actor (re)started: the driver's progress and heartbeat."""
        return self.done_steps

    def run_unit(self, unit: Unit) -> UnitResult:
        return self.runner.run_unit(unit, on_step=self._step)

    def _step(self) -> None:
        self.done_steps += 1

    def close(self) -> None:
        self.runner.close()


class RayExecutor:
    """``workers`` Ray actors, one browser each (see the module docstring)."""

    def __init__(self, workers: int):
        self.workers = workers

    def run(self, units: list[Unit], config: RunConfig, events: Events) -> None:
        ray = require_ray()
        end_orphan_browsers()  # this host's, left by the actors of a run that was killed
        started = _connect(ray, self.workers)
        actors: list[Any] = []
        servers: dict[str, Any] = {}
        try:
            remote = ray.remote(BrowserActor).options(
                num_cpus=1, max_restarts=config.unit_retries, max_task_retries=config.unit_retries,
                max_concurrency=2, scheduling_strategy="SPREAD")
            _check_room(ray, self.workers)
            servers = start_servers(ray, config, self.workers) if config.feature_server else {}
            actors = [remote.remote(config, os.getcwd(), servers) for _ in range(self.workers)]
            _Dispatch(ray, actors, events, config.hang_timeout_s).run(list(units))
            ray.get([actor.close.remote() for actor in actors], timeout=60)  # every actor is idle now
        finally:
            for actor in [*actors, *servers.values()]:
                ray.kill(actor, no_restart=True)
            if started:
                ray.shutdown()


class FeatureServer:
    """A Ray actor's body: one node's shared live featurizer (module docstring). Async: requests queue while a batch
    runs in a thread, and the next batch takes them."""

    def __init__(self, recipe: dict[str, Any], folder: str, threads: int, wait_s: float = 0.005, max_batch: int = 16):
        import torch

        from digiq.live_features import LiveFeaturizer

        if os.path.isdir(folder):
            os.chdir(folder)
        torch.set_num_threads(threads)
        self.featurizer = LiveFeaturizer(**recipe["features"], cache=recipe.get("cache"))
        self.wait_s, self.max_batch = wait_s, max_batch
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.drainer: asyncio.Task | None = None
        self.batches: list[int] = []  # the size of every batch run (benchmarks read it)

    async def describe(self) -> dict[str, Any]:
        return {"variant": self.featurizer.variant, "model": self.featurizer.model, "batches": list(self.batches),
                "pid": os.getpid()}

    async def dims(self, inputs: Any = None) -> tuple[int, int]:
        return self.featurizer.dims(inputs)

    async def featurize(self, request: Any) -> tuple[Any, Any, Any]:
        """(x_V, x_Q, the request's episode state one step on) of one request, computed in a batch."""
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.queue:
            await asyncio.sleep(self.wait_s)  # let the other browsers' requests of this moment arrive
            batch, self.queue = self.queue[:self.max_batch], self.queue[self.max_batch:]
            try:
                results = await loop.run_in_executor(None, self.featurizer.batch, [r for r, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                for _, future in batch:
                    future.set_exception(exc)
                continue
            self.batches.append(len(batch))
            for (request, future), (x_v, x_q) in zip(batch, results, strict=True):
                future.set_result((x_v, x_q, request.episode))


class ServerFeaturizer:
    """What a browser actor's policy featurizes with when its node shares one model: the
    :class:`~digiq.live_features.LiveFeaturizer` interface, its episode's state kept here, the work done by a
    :class:`FeatureServer`."""

    def __init__(self, server: Any):
        from digiq.live_features import EpisodeState

        self.ray, self.server = require_ray(), server
        info = self.ray.get(server.describe.remote())
        self.variant, self.model, self.episode = info["variant"], info["model"], EpisodeState()

    def reset(self) -> None:
        from digiq.live_features import EpisodeState

        self.episode = EpisodeState()

    def dims(self, inputs: Any = None) -> tuple[int, int]:
        return tuple(self.ray.get(self.server.dims.remote(inputs)))

    def __call__(self, view: Any, actions: list[Any], inputs: Any = None) -> tuple[Any, Any]:
        from digiq.live_features import Request

        x_v, x_q, self.episode = self.ray.get(self.server.featurize.remote(Request(view, list(actions), inputs, self.episode)))
        return x_v, x_q


def with_server(config: RunConfig, servers: dict[str, Any]) -> RunConfig:
    """``config`` whose policy featurizes with this node's server (another node's when this one has none)."""
    node = require_ray().get_runtime_context().get_node_id()
    server = servers.get(node) or next(iter(servers.values()))
    featurizer = ServerFeaturizer(server)

    def served(spec: PolicySpec) -> PolicySpec:
        return PolicySpec(spec.name, {**spec.kwargs, "featurizer": featurizer})

    return dataclasses.replace(config, policy=served(config.policy),
                               policies=tuple((name, served(spec)) for name, spec in config.policies))


def start_servers(ray: Any, config: RunConfig, workers: int) -> dict[str, Any]:
    """node id -> a :class:`FeatureServer` pinned to that node, one on every live node with CPUs (browser actors
    may land on any), each with as many compute threads as its node has CPUs (at most ``workers``)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    servers = {}
    for node in ray.nodes():
        cpus = int(node.get("Resources", {}).get("CPU", 0))
        if node.get("Alive") and cpus > 0:
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            remote = ray.remote(FeatureServer).options(num_cpus=0, scheduling_strategy=strategy, max_restarts=-1,
                                                       max_task_retries=config.unit_retries)
            servers[node["NodeID"]] = remote.remote(config.feature_server, os.getcwd(), min(cpus, workers))
    try:
        ray.get([server.describe.remote() for server in servers.values()])  # loaded (a broken recipe fails here, once)
    except ray.exceptions.RayError as exc:
        for server in servers.values():
            ray.kill(server, no_restart=True)
        raise DigiqError(f"the shared feature model did not start: {_short(exc)}", field="evaluate.shared_model") from None
    return servers


def _connect(ray: Any, workers: int) -> bool:
    """Join RAY_ADDRESS's cluster (or the one this process is already connected to), else start a local Ray with a
    CPU per worker; True when this call started it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {} if address else {"num_cpus": max(workers, os.cpu_count() or 1), "include_dashboard": False}
    ray.init(address=address, log_to_driver=False, configure_logging=False, **kwargs)
    return True


def _check_room(ray: Any, workers: int) -> None:
    """Refuse more browsers than the cluster has CPUs (an actor asks for one): the extra ones would wait forever."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < workers:
        raise DigiqError(f"{workers} workers need {workers} CPUs on the Ray cluster (one per browser actor), it has {cpus}: "
                         f"lower the stage's workers or add nodes (`ray start --num-cpus`)", field="workers")


class _Dispatch:
    """Keeps one unit in flight per actor and hands each result to the driver as it returns. Every ``POLL_S`` it
    reads each busy actor's step count: new steps are progress; none for ``hang_timeout_s`` means a hung actor,
    which is killed for Ray to restart (its unit is retried by Ray, as after a crash)."""

    POLL_S = 1.0

    def __init__(self, ray: Any, actors: list[Any], events: Events, hang_timeout_s: float):
        self.ray, self.actors, self.events, self.hang_timeout_s = ray, actors, events, hang_timeout_s
        self.last_task: list[str | None] = [None] * len(actors)
        self.worker: list[str] = ray.get([actor.name.remote() for actor in actors])  # host:pid, to tell a restart
        self.flight: dict[Any, tuple[int, Unit]] = {}
        self.steps = [0] * len(actors)  # the actor's count when last read
        self.heard = [time.monotonic()] * len(actors)  # when it last moved

    def run(self, todo: list[Unit]) -> None:
        idle = list(range(len(self.actors)))
        while todo or self.flight:
            while idle and todo:
                a = idle.pop(0)
                unit = next_unit(todo, self.last_task[a])
                self.last_task[a], self.heard[a] = unit.task, time.monotonic()
                self.flight[self.actors[a].run_unit.remote(unit)] = (a, unit)
            ready, _ = self.ray.wait(list(self.flight), num_returns=1, timeout=self.POLL_S)
            for ref in ready:
                idle.append(self._finished(ref))
            if not ready:
                self._poll()

    def _finished(self, ref: Any) -> int:
        a, unit = self.flight.pop(ref)
        try:
            result: UnitResult = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            raise DigiqError(f"unit {unit.key} failed on Ray after {_short(exc)}", field="executor") from None
        if result.worker != self.worker[a]:
            self.events.restart(f"{unit.key}: actor {a} restarted ({self.worker[a]} → {result.worker}); unit re-run")
            self.worker[a] = result.worker
        try:
            self._progress(a, self.ray.get(self.actors[a].steps.remote(), timeout=30))  # the steps not polled yet
        except self.ray.exceptions.RayError:  # the actor went away after returning: its unit is in all the same
            pass
        for summary in result.summaries:
            self.events.episode(summary)
        self.events.on_unit(unit, result)
        return a

    def _poll(self) -> None:
        busy = {a: unit for a, unit in self.flight.values()}
        asked = {self.actors[a].steps.remote(): a for a in busy}
        answered, _ = self.ray.wait(list(asked), num_returns=len(asked), timeout=self.POLL_S)
        counts = {}
        for ref in answered:
            try:
                counts[asked[ref]] = self.ray.get(ref)
            except self.ray.exceptions.RayError:  # restarting: no news
                pass
        now = time.monotonic()
        for a, unit in busy.items():
            if counts.get(a, self.steps[a]) != self.steps[a]:
                self._progress(a, counts[a])
                self.heard[a] = now
            elif now - self.heard[a] > self.hang_timeout_s:
                self.events.restart(f"{unit.key}: actor {a} silent for {self.hang_timeout_s:g} s; restarted it")
                self.ray.kill(self.actors[a], no_restart=False)  # Ray restarts it and retries its unit
                self.heard[a] = now

    def _progress(self, a: int, count: int) -> None:
        """Step events for the actor's steps since last read (``count`` below it: the actor restarted, counting anew)."""
        for _ in range(count - self.steps[a] if count >= self.steps[a] else count):
            self.events.step()
        self.steps[a] = count


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " | ".join(lines[-3:])[:600]
