"""`digiq features materialize|get`: the Feast feature store of frozen embeddings, labels and rewards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load

app = typer.Typer(no_args_is_help=True, help="Feast feature store: materialize frozen features, read them online.")
VARIANT_OPTION = typer.Option(None, "--variant", help="embedding variant: data/embeddings/<variant>/")


@app.command("materialize")
@handle_errors
def materialize(params: Path = PARAMS_OPTION, overrides: list[str] | None = SET_OPTION, variant: str | None = VARIANT_OPTION) -> None:
    """Check the embedding/label/step tables, derive the served sources, `feast apply` and materialize them."""
    from digiq.pipelines import features as stage

    result = stage.run(load(params, overrides, {"features.variant": variant}), progress=True)
    rows = ", ".join(f"{name} {count}" for name, count in result["rows"].items())
    typer.echo(f"materialized variant {result['variant']} (d = {result['dim']} per state, {result['dim_candidate']} per candidate): "
               f"{rows} in {result['timings_s']['total']:.1f} s")


@app.command("get")
@handle_errors
def get(
    traj: str = typer.Option(..., "--traj", help="trajectory id"),
    step: int = typer.Option(..., "--step", help="step id"),
    candidates: bool = typer.Option(False, "--candidates", help="also read the state's K candidate actions and embeddings"),
    as_json: bool = typer.Option(False, "--json", help="print every value (full embeddings) as JSON"),
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
    variant: str | None = VARIANT_OPTION,
) -> None:
    """Read one state's features (f(s), reward, done, s', ε-label; with --candidates f(s, a_k)) from the online store."""
    from digiq.store_client import online_state, open_store

    features = load(params, overrides, {"features.variant": variant}).features
    row = online_state(open_store(features.repo, features.variant), traj, step, candidates=candidates)
    if as_json:
        typer.echo(json.dumps(_jsonable(row)))
    else:
        _print_state(row)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _summary(vector) -> str:
    head = ", ".join(f"{v:+.4f}" for v in vector[:4])
    return f"[{head}, …] d={len(vector)} ‖·‖={float((vector.astype('float64') ** 2).sum() ** 0.5):.4f}"


def _short(action: str) -> str:
    """`tap (y=0.52, x=0.31)` for the viewer; the raw string where it does not parse."""
    from digiq.actions import describe_action, parse_action
    from digiq.errors import DigiqError

    try:
        return describe_action(parse_action(action))
    except DigiqError:
        return action


def _print_state(row: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"state {row['state_key']}", show_header=False)
    for name, value in row.items():
        if name in ("state_key", "candidates"):
            continue
        shown = _summary(value) if name == "embedding" else _short(value) if name == "action" else str(value)
        table.add_row(name, shown)
    console.print(table)
    if "candidates" in row:
        cands = row["candidates"]
        listing = Table(title=f"{len(cands['cand_idx'])} candidates (0 = dataset action)")
        for column in ("cand_idx", "action", "draws", "embedding"):
            listing.add_column(column)
        for idx, action, draws, vector in zip(cands["cand_idx"], cands["action"], cands["draws"], cands["embedding"]):
            listing.add_row(str(idx), _short(action), str(draws), _summary(vector))
        console.print(listing)
