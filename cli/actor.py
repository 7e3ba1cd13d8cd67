"""`digiq actor --method M`: extract a policy (Best-of-N or a baseline) from the frozen features and the critic."""

from __future__ import annotations

from typing import Any

import typer

from digiq.cli.common import Flag, device, out, stage_command, variant


def register(app: typer.Typer) -> None:
    method = Flag("--method", "policy extraction method, one of actor.methods' choices (digiq = Best-of-N)", default=...)
    stage_command(app, "actor", actor, method, out("actor.out", "policy folders, one sub-folder per method"),
                  variant("features.variant"), device("actor.device"))


def actor(params: Any, method: str) -> None:
    """Train a candidate-scoring policy by weighted imitation (digiq = Best-of-N on the critic's advantage)."""
    from digiq.pipelines import actor as stage

    outcome = stage.run(params, method=method, progress=True)
    m = outcome.metrics
    advantage = m.get("mean_advantage_kept")
    typer.echo(f"actor {method}: kept {m['n_kept']}/{m['n_states']} states ({100 * m['frac_states_kept']:.1f} %), "
               f"mean advantage of kept {'–' if advantage is None else f'{advantage:.4g}'}, "
               f"loss {m['train_loss']:.4g}, agreement {m['agreement']:.3f}")
    typer.echo(f"wrote {outcome.out}")
