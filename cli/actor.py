"""`digiq actor --method M`: extract a policy (Best-of-N or a baseline) from the frozen features and the critic."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("actor")(actor)


@handle_errors
def actor(
    method: str = typer.Option(..., "--method", help="policy extraction method, one of actor.methods' choices (digiq = Best-of-N)"),
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
    out: Path | None = typer.Option(None, "--out", help="policy folders, one sub-folder per method"),
    variant: str | None = typer.Option(None, "--variant", help="embedding variant served by Feast"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
) -> None:
    """Train a candidate-scoring policy by weighted imitation (digiq = Best-of-N on the critic's advantage)."""
    from digiq.pipelines import actor as stage

    cfg = load(params, overrides, {"actor.out": out, "features.variant": variant, "actor.device": device})
    outcome = stage.run(cfg, method=method, progress=True)
    m = outcome.metrics
    advantage = m.get("mean_advantage_kept")
    typer.echo(f"actor {method}: kept {m['n_kept']}/{m['n_states']} states ({100 * m['frac_states_kept']:.1f} %), "
               f"mean advantage of kept {'–' if advantage is None else f'{advantage:.4g}'}, "
               f"loss {m['train_loss']:.4g}, agreement {m['agreement']:.3f}")
    typer.echo(f"wrote {outcome.out}")
