"""`digiq critic`: train the double Q/V critic (TD, or the MC ablation) on the features served by Feast."""

from __future__ import annotations

from typing import Any

import typer

from digiq.cli.common import device, out, stage_command, variant


def register(app: typer.Typer) -> None:
    stage_command(app, "critic", critic, out("critic.out", "critic folder: weights, config, step and candidate scores"),
                  variant("features.variant"), device("critic.device"))


def critic(params: Any) -> None:
    """Train Q1, Q2, V1, V2 on frozen f(s), f(s, a) with Polyak target nets; write weights, scores, diagnostics."""
    from digiq.pipelines import critic as stage

    outcome = stage.run(params, progress=True)
    _print_summary(outcome.metrics)
    typer.echo(f"wrote {outcome.out}, {params.critic.metrics}, {params.critic.live_dir}")


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_summary(m: dict[str, Any]) -> None:
    rows = m["rows"]
    typer.echo(f"critic ({m['target']}, variant {m['variant']}): {rows['train']} train / {rows['val']} val transitions, "
               f"{rows['truncated']} truncated dropped; {m['updates']} updates at {m['timings_s']['updates_per_s']:.0f}/s")
    typer.echo(f"  val Q loss {_fmt(m['val'].get('q_loss'))}, val V loss {_fmt(m['val'].get('v_loss'))}; "
               f"on {m['diagnostics_on']}: action sensitivity {_fmt(m['action_sensitivity'])}, "
               f"ranking quality {_fmt(m['ranking_quality'])}, corr(V, G) {_fmt(m['v_return_corr'])}")
