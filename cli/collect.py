"""`digiq collect` (the offline dataset from π_β in MiniWoB++) and `digiq rollout` (any policy, online)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick

TASKS_HELP = "MiniWoB task names, comma-separated or repeated"


def register(app: typer.Typer) -> None:
    app.command("collect")(collect)
    app.command("rollout")(rollout)


@handle_errors
def collect(
    tasks: list[str] | None = typer.Option(None, "--tasks", help=f"{TASKS_HELP} [params: collect.tasks]"),
    episodes_per_task: int | None = typer.Option(None, "--episodes-per-task", help="episodes per task [params: collect.episodes_per_task]"),
    seed: int | None = typer.Option(None, "--seed", help="base seed [params: collect.seed]"),
    workers: int | None = typer.Option(None, "--workers", help="browser processes [params: collect.workers]"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="episode length cap [params: collect.max_steps]"),
    noise: float | None = typer.Option(None, "--noise", help="behaviour policy noise [params: collect.noise]"),
    out: Path | None = typer.Option(None, "--out", help="dataset folder [params: collect.out]"),
    success_band: str | None = typer.Option(None, "--success-band", help="allowed episode success rate LOW,HIGH [params: collect.success_band]"),
    require_actions: str | None = typer.Option(None, "--require-actions", help="action kinds the data must contain, comma-separated [params: collect.required_action_kinds]"),
    metrics: Path | None = typer.Option(None, "--metrics", help="metrics file [params: collect.metrics]"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Collect the offline dataset: π_β in headless Chromium, parallel workers, resumable shards, GX checks."""
    from digiq.pipelines import collect as stage

    config = stage.config_from_params(
        load(params), tasks=_split(tasks) if tasks else None, episodes_per_task=episodes_per_task, seed=seed,
        workers=workers, max_steps=max_steps, noise=noise, out=str(out) if out else None,
        success_band=_band(success_band) if success_band else None,
        required_action_kinds=_split([require_actions]) if require_actions else None, metrics=str(metrics) if metrics else None,
    )
    outcome = stage.run(config, progress=True, report=_print_collect)
    typer.echo(f"wrote {config.out} ({outcome.collected_units} shards collected, {outcome.kept_units} kept), "
               f"{config.checks}/index.html, {config.metrics}")


@handle_errors
def rollout(
    policy: str = typer.Option("behavior", "--policy", help="registered policy name or package.module:factory"),
    policy_arg: list[str] | None = typer.Option(None, "--policy-arg", help="KEY=VALUE passed to the policy factory (repeatable)"),
    tasks: list[str] | None = typer.Option(None, "--tasks", help=f"{TASKS_HELP} [params: collect.tasks]"),
    episodes: int = typer.Option(20, "--episodes", help="episodes per task"),
    seed: int = typer.Option(1000, "--seed", help="base seed (pick one the training data was not collected with)"),
    workers: int | None = typer.Option(None, "--workers", help="browser processes [params: collect.workers]"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="episode length cap [params: collect.max_steps]"),
    out: Path | None = typer.Option(None, "--out", help="write the results as JSON here"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Run a policy online and print its success rate per task."""
    from digiq.envs.policy import PolicySpec
    from digiq.pipelines import rollout as stage

    cfg = load(params)
    kwargs = _policy_kwargs(policy_arg or [])
    if policy == "behavior":
        kwargs.setdefault("noise", cfg.collect.noise)
    config = stage.RolloutConfig(
        policy=PolicySpec(policy, kwargs),
        tasks=_split(tasks) if tasks else list(cfg.collect.tasks),
        episodes=episodes,
        seed=seed,
        workers=pick(workers, cfg.collect.workers),
        max_steps=pick(max_steps, cfg.collect.max_steps),
        history=cfg.collect.history,
        time_limit_s=cfg.collect.time_limit_s,
    )
    result = stage.run(config, progress=True, out=out)
    _print_rollout(result, policy)
    if out is not None:
        typer.echo(f"wrote {out}")


def _split(values: list[str]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _band(text: str) -> tuple[float, float]:
    from digiq.errors import DigiqError

    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise DigiqError(f"expected LOW,HIGH (e.g. 0.2,0.6), got {text!r}", field="--success-band") from None
    return low, high


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
