"""`digiq candidates`: K candidate actions per state from the behaviour policy, with the action-diversity gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick


def register(app: typer.Typer) -> None:
    app.command("candidates")(candidates)


@handle_errors
def candidates(
    dataset: Path | None = typer.Option(None, "--dataset", help="dataset folder [params: collect.out]"),
    k: int | None = typer.Option(None, "--k", help="candidates per state, index 0 the dataset action [params: candidates.k]"),
    seed: int | None = typer.Option(None, "--seed", help="base seed of the per-state draws [params: candidates.seed]"),
    out: Path | None = typer.Option(None, "--out", help="candidate table (Parquet) [params: candidates.out]"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Sample K actions per stored state from π_β (index 0 = the dataset action); gate their diversity."""
    from digiq.pipelines import candidates as stage

    cfg = load(params)
    p = stage.candidates_params(cfg)
    p = stage.validated(stage.CandidatesParams, {**p.model_dump(), "k": pick(k, p.k), "seed": pick(seed, p.seed),
                                                 "out": str(pick(out, p.out))}, "candidates")
    outcome = stage.run(pick(dataset, Path(cfg.collect.out)), p, behavior=cfg.collect.behavior, progress=True, report=_print)
    typer.echo(f"wrote {p.out}, {p.metrics}, {p.checks}/index.html ({outcome.seconds:.1f} s)")


def _print(m: dict[str, Any]) -> None:
    typer.echo(f"{m['states']} states × K={m['k']} ({m['source']}): {m['mean_distinct']:.1f} distinct actions per state "
               f"on average (min {m['min_distinct']}, median {m['median_distinct']:g}), "
               f"{100 * m['frac_two_distinct']:.1f} % of states with ≥ 2, {100 * m['duplicate_fraction']:.1f} % duplicates")
