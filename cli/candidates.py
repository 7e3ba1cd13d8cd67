"""`digiq candidates`: K candidate actions per state from the behaviour policy, with the action-diversity gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("candidates")(candidates)


@handle_errors
def candidates(
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
    out: Path | None = typer.Option(None, "--out", help="candidate table (Parquet)"),
    seed: int | None = typer.Option(None, "--seed", help="base seed of the per-state draws"),
) -> None:
    """Sample K actions per stored state from π_β (index 0 = the dataset action); gate their diversity."""
    from digiq.pipelines import candidates as stage

    cfg = load(params, overrides, {"candidates.out": out, "candidates.seed": seed})
    outcome = stage.run(cfg, progress=True, report=_print)
    p = cfg.candidates
    typer.echo(f"wrote {p.out}, {p.metrics}, {p.checks}/index.html ({outcome.seconds:.1f} s)")


def _print(m: dict[str, Any]) -> None:
    typer.echo(f"{m['states']} states × K={m['k']} ({m['source']}): {m['mean_distinct']:.1f} distinct actions per state "
               f"on average (min {m['min_distinct']}, median {m['median_distinct']:g}), "
               f"{100 * m['frac_two_distinct']:.1f} % of states with ≥ 2, {100 * m['duplicate_fraction']:.1f} % duplicates")
