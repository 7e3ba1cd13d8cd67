"""`digiq critic`: train the double Q/V critic (TD, or the MC ablation) on the features served by Feast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick


def register(app: typer.Typer) -> None:
    app.command("critic")(critic)


@handle_errors
def critic(
    target: str | None = typer.Option(None, "--target", help="td (bootstrapped, target nets) or mc (discounted return) [params: critic.target]"),
    variant: str | None = typer.Option(None, "--variant", help="embedding variant served by Feast [params: features.variant]"),
    repo: Path | None = typer.Option(None, "--repo", help="Feast repository folder [params: features.repo]"),
    out: Path | None = typer.Option(None, "--out", help="critic folder: weights, config, step/candidate scores [params: critic.out]"),
    updates: int | None = typer.Option(None, "--updates", help="gradient updates [params: critic.updates]"),
    metrics: Path = typer.Option(Path("metrics/critic.json"), "--metrics", help="metrics file"),
    live: Path = typer.Option(Path("dvclive/critic"), "--live", help="DVCLive folder of the training curves"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Train Q1, Q2, V1, V2 on frozen f(s), f(s, a) with Polyak target nets; write weights, scores, diagnostics."""
    from digiq.pipelines import critic as stage
    from digiq.pipelines.features import ensure_store

    if target not in (None, "td", "mc"):
        raise typer.BadParameter(f"{target!r} is not td or mc", param_hint="--target")
    cfg = load(params)
    config = stage.critic_config(cfg, target)
    if updates is not None:
        config = config.model_copy(update={"updates": updates})
    repo, variant = pick(repo, Path(cfg.features.repo)), pick(variant, cfg.features.variant)
    ensure_store(cfg, repo, variant, say=typer.echo)
    outcome = stage.run(
        config,
        repo=repo,
        variant=variant,
        out=pick(out, Path(cfg.critic.out)),
        metrics_path=metrics,
        live_dir=live,
        val_fraction=stage.val_fraction(cfg),
        progress=True,
        checkpoint_every=cfg.critic.checkpoint_every,
    )
    _print_summary(outcome.metrics)
    typer.echo(f"wrote {outcome.out}, {metrics}, {live}")


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_summary(m: dict[str, Any]) -> None:
    rows = m["rows"]
    typer.echo(f"critic ({m['target']}, variant {m['variant']}): {rows['train']} train / {rows['val']} val transitions, "
               f"{rows['truncated']} truncated dropped; {m['updates']} updates at {m['timings_s']['updates_per_s']:.0f}/s")
    typer.echo(f"  val Q loss {_fmt(m['val'].get('q_loss'))}, val V loss {_fmt(m['val'].get('v_loss'))}; "
               f"on {m['diagnostics_on']}: action sensitivity {_fmt(m['action_sensitivity'])}, "
               f"ranking quality {_fmt(m['ranking_quality'])}, corr(V, G) {_fmt(m['v_return_corr'])}")
