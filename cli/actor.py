"""`digiq actor --method M`: extract a policy (Best-of-N or a baseline) from the frozen features and the critic."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick

METHODS = ("digiq", "bc", "filtered-bc", "awr", "reinforce")  # == digiq.pipelines.actor.METHODS (kept light here)


def register(app: typer.Typer) -> None:
    app.command("actor")(actor)


@handle_errors
def actor(
    method: str = typer.Option(..., "--method", help=f"policy extraction method: {' | '.join(METHODS)}"),
    variant: str | None = typer.Option(None, "--variant", help="embedding variant served by Feast [params: features.variant]"),
    repo: Path | None = typer.Option(None, "--repo", help="Feast repository folder [params: features.repo]"),
    critic: Path | None = typer.Option(None, "--critic", help="trained critic folder [params: critic.out]"),
    out: Path | None = typer.Option(None, "--out", help="policy folder [params: actor.out/<method>]"),
    updates: int | None = typer.Option(None, "--updates", help="gradient updates [params: actor.updates]"),
    metrics: Path | None = typer.Option(None, "--metrics", help="metrics file [default: metrics/actor/<method>.json]"),
    live: Path | None = typer.Option(None, "--live", help="DVCLive folder [default: dvclive/actor/<method>]"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Train a candidate-scoring policy by weighted imitation (digiq = Best-of-N on the critic's advantage)."""
    from digiq.pipelines import actor as stage
    from digiq.pipelines.features import ensure_store

    if method not in METHODS:
        raise typer.BadParameter(f"{method!r} is not one of {', '.join(METHODS)}", param_hint="--method")
    cfg = load(params)
    config = stage.actor_config(cfg, method)
    if updates is not None:
        config = config.model_copy(update={"updates": updates})
    repo, variant = pick(repo, Path(cfg.features.repo)), pick(variant, cfg.features.variant)
    ensure_store(cfg, repo, variant, say=typer.echo)
    outcome = stage.run(
        config,
        repo=repo,
        variant=variant,
        critic_dir=pick(critic, Path(cfg.critic.out)),
        out=pick(out, Path(cfg.actor.out) / method),
        metrics_path=pick(metrics, Path("metrics/actor") / f"{method}.json"),
        live_dir=pick(live, Path("dvclive/actor") / method),
        progress=True,
    )
    m = outcome.metrics
    advantage = m.get("mean_advantage_kept")
    typer.echo(f"actor {method}: kept {m['n_kept']}/{m['n_states']} states ({100 * m['frac_states_kept']:.1f} %), "
               f"mean advantage of kept {'–' if advantage is None else f'{advantage:.4g}'}, "
               f"loss {m['train_loss']:.4g}, agreement {m['agreement']:.3f}")
    typer.echo(f"wrote {outcome.out}")
