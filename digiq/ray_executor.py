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
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from digiq.envs.browser_cleanup import end_orphan_browsers
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

    def __init__(self, config: RunConfig, folder: str):
        try:
            os.setpgrp()  # lead a process group: whoever ends orphans later ends this actor's chromedriver with it
        except OSError:  # already a session leader: its group is its own
            pass
        end_orphan_browsers()
        if os.path.isdir(folder):
            os.chdir(folder)
        self.runner = UnitRunner(config)
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
        try:
            remote = ray.remote(BrowserActor).options(
                num_cpus=1, max_restarts=config.unit_retries, max_task_retries=config.unit_retries,
                max_concurrency=2, scheduling_strategy="SPREAD")
            _check_room(ray, self.workers)
            actors = [remote.remote(config, os.getcwd()) for _ in range(self.workers)]
            _Dispatch(ray, actors, events, config.hang_timeout_s).run(list(units))
            ray.get([actor.close.remote() for actor in actors], timeout=60)  # every actor is idle now
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            if started:
                ray.shutdown()


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
