"""Browser rollouts on Ray: one actor per browser, each running whole units; the driver commits what they return.

    executor: ray      (collect.executor / evaluate.executor, or ``--executor ray``)
    RAY_ADDRESS set    join that cluster (``ray start --head`` on one host, ``ray start --address=…`` on the others)
    RAY_ADDRESS unset  start a Ray on this machine for the run, and shut it down after

Contract: the driver keeps ``workers`` actors busy, one unit in flight per actor (a unit of the task the actor's
browser already shows while there is one), and passes each returned :class:`~digiq.envs.workers.UnitResult` to
the same commit as the local pool (:func:`~digiq.envs.workers.run_units`). Actors are spread over the nodes.

Faults are Ray's to handle, not a watchdog's: an actor whose process is killed, or whose node is lost, is restarted
(``max_restarts``; on another node if its own is gone) and its unit re-run from the start (``max_task_retries``),
``RunConfig.unit_retries`` times each. A unit's episodes depend only on (task, episode seed), and the driver commits
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
    """A Ray actor's body: one :class:`UnitRunner` (policy and browser), in the driver's folder."""

    def __init__(self, config: RunConfig, folder: str):
        try:
            os.setpgrp()  # lead a process group: whoever ends orphans later ends this actor's chromedriver with it
        except OSError:  # already a session leader: its group is its own
            pass
        end_orphan_browsers()
        if os.path.isdir(folder):
            os.chdir(folder)
        self.runner = UnitRunner(config)

    def name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def run_unit(self, unit: Unit) -> UnitResult:
        return self.runner.run_unit(unit)

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
                scheduling_strategy="SPREAD")
            actors = [remote.remote(config, os.getcwd()) for _ in range(self.workers)]
            _dispatch(ray, actors, list(units), events)
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


def _dispatch(ray: Any, actors: list[Any], todo: list[Unit], events: Events) -> None:
    """Keep one unit in flight per actor; hand each result to the driver as it returns."""
    last_task: list[str | None] = [None] * len(actors)
    worker: list[str] = ray.get([actor.name.remote() for actor in actors])  # host:pid, to tell a restarted actor
    flight: dict[Any, tuple[int, Unit]] = {}
    idle = list(range(len(actors)))
    while todo or flight:
        while idle and todo:
            a = idle.pop(0)
            unit = next_unit(todo, last_task[a])
            last_task[a] = unit.task
            flight[actors[a].run_unit.remote(unit)] = (a, unit)
        (ref,), _ = ray.wait(list(flight), num_returns=1)
        a, unit = flight.pop(ref)
        try:
            result: UnitResult = ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise DigiqError(f"unit {unit.key} failed on Ray after {_short(exc)}", field="executor") from None
        if result.worker != worker[a]:
            events.restart(f"{unit.key}: actor {a} restarted ({worker[a]} → {result.worker}); unit re-run")
        worker[a] = result.worker
        for summary in result.summaries:
            for _ in range(summary["steps"]):
                events.step()
            events.episode(summary)
        events.on_unit(unit, result)
        idle.append(a)


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " | ".join(lines[-3:])[:600]
