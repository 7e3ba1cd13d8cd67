"""`digiq candidates`: K candidate actions per state from the behaviour policy, with the action-diversity gate."""

from __future__ import annotations

from typing import Any

import typer

from digiq.cli.common import out, seed, stage_command


def register(app: typer.Typer) -> None:
    stage_command(app, "candidates", candidates, out("candidates.out", "candidate table (Parquet)"),
                  seed("candidates.seed", "base seed of the per-state draws"))


def candidates(params: Any) -> None:
    """Sample K actions per stored state from π_β (index 0 = the dataset action); gate their diversity."""
    from digiq.pipelines import candidates as stage

    outcome = stage.run(params, progress=True, report=_print)
    p = params.candidates
    typer.echo(f"wrote {p.out}, {p.metrics}, {p.checks}/index.html ({outcome.seconds:.1f} s)")


def _print(m: dict[str, Any]) -> None:
    typer.echo(f"{m['states']} states × K={m['k']} ({m['source']}): {m['mean_distinct']:.1f} distinct actions per state "
               f"on average (min {m['min_distinct']}, median {m['median_distinct']:g}), "
               f"{100 * m['frac_two_distinct']:.1f} % of states with ≥ 2, {100 * m['duplicate_fraction']:.1f} % duplicates")
