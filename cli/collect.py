"""`digiq collect` (the offline dataset from π_β in MiniWoB++) and `digiq rollout` (any policy, online)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import Flag, episodes, out, seed, stage_command, tasks, workers

EXECUTOR_HELP = "where the browsers run: local | ray (the cluster at RAY_ADDRESS, else a local Ray)"


def register(app: typer.Typer) -> None:
    stage_command(app, "collect", collect, tasks("collect.tasks"), episodes("collect.episodes_per_task"), seed("collect.seed"),
                  workers("collect.workers"), Flag("--executor", EXECUTOR_HELP, "collect.executor"), out("collect.out", "dataset folder"))
    stage_command(app, "rollout", rollout,
                  Flag("--policy", "registered policy name or package.module:factory", default="behavior"),
                  Flag("--policy-arg", "passed to the policy factory (repeatable)", type=list[str], metavar="KEY=VALUE"),
                  tasks("collect.tasks"), workers("collect.workers"), Flag("--executor", EXECUTOR_HELP, "collect.executor"),
                  Flag("--episodes", "episodes per task", type=int, default=20),
                  Flag("--seed", "base seed (pick one the training data was not collected with)", type=int, default=1000),
                  Flag("--out", "write the results as JSON here", type=Path))


def collect(params: Any) -> None:
    """Collect the offline dataset: π_β in headless Chromium, parallel workers, resumable shards, GX checks."""
    from digiq.pipelines import collect as stage

    outcome = stage.run(params, progress=True, report=_print_collect)
    section = params.collect
    typer.echo(f"wrote {section.out} ({outcome.collected_units} shards collected, {outcome.kept_units} kept), "
               f"{section.checks}/index.html, {section.metrics}")


def rollout(params: Any, policy: str, policy_arg: list[str] | None, episodes: int, seed: int, out: Path | None) -> None:
    """Run a policy online (with the collect section's episode settings) and print its success rate per task."""
    from digiq.envs.policy import PolicySpec
    from digiq.pipelines import rollout as stage

    kwargs = _policy_kwargs(policy_arg or [])
    if policy == "behavior":
        kwargs.setdefault("noise", params.collect.noise)
    result = stage.run(params, policy=PolicySpec(policy, kwargs), episodes=episodes, seed=seed, out=out, progress=True)
    _print_rollout(result, policy)
    if out is not None:
        typer.echo(f"wrote {out}")


def _policy_kwargs(pairs: list[str]) -> dict[str, Any]:
    import yaml

    from digiq.errors import DigiqError

    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DigiqError(f"expected KEY=VALUE, got {pair!r}", field="--policy-arg")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


def _print_collect(m: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"collect: {m['transitions']} transitions, {m['episodes']} episodes, "
                        f"{m['wall_seconds']:.0f} s ({m['steps_per_second']:.1f} steps/s collecting)")
    for column in ("task", "episodes", "transitions", "success", "mean length"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, e in m["per_task"].items():
        table.add_row(task, str(e["episodes"]), str(e["transitions"]), f"{100 * e['success']:.0f} %", f"{e['mean_length']:.1f}")
    table.add_row("all", str(m["episodes"]), str(m["transitions"]), f"{100 * m['success']:.0f} %", f"{m['mean_length']:.1f}", style="bold")
    Console().print(table)
    kinds = ", ".join(f"{k} {v}" for k, v in m["action_kinds"].items())
    typer.echo(f"actions: {kinds}; checks {'passed' if m['checks_passed'] else 'FAILED'}")


def _print_rollout(result: Any, policy: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rollout of {policy}: {100 * result.success:.1f} % success ({result.seconds:.0f} s)")
    for column in ("task", "episodes", "success", "mean steps", "timed out", "step cap"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, e in result.per_task.items():
        table.add_row(task, str(e["episodes"]), f"{100 * e['success']:.0f} %", f"{e['mean_steps']:.1f}", str(e["timed_out"]), str(e["step_cap"]))
    Console().print(table)
