"""`digiq features materialize|get`: the Feast feature store of frozen embeddings, labels and rewards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick

app = typer.Typer(no_args_is_help=True, help="Feast feature store: materialize frozen features, read them online.")


def _settings(params_path: Path, repo: Path | None, variant: str | None):
    from digiq.pipelines.features import features_params

    params = load(params_path)
    fp = features_params(params)
    fp = fp.model_copy(update={"repo": str(pick(repo, fp.repo)), "variant": pick(variant, fp.variant)})
    return params, fp


@app.command("materialize")
@handle_errors
def materialize(
    variant: str = typer.Option(None, "--variant", help="embedding variant: data/embeddings/<variant>/ [params: features.variant]"),
    repo: Path = typer.Option(None, "--repo", help="Feast repository folder [params: features.repo]"),
    embeddings: Path = typer.Option(None, "--embeddings", help="folder of embedding variants [params: features.embeddings]"),
    dataset: Path = typer.Option(None, "--dataset", help="trajectory dataset folder [params: collect.out]"),
    labels: Path = typer.Option(None, "--labels", help="ε-label table [params: label.out]"),
    metrics: Path = typer.Option(None, "--metrics", help="metrics JSON written at the end [params: features.metrics]"),
    params_path: Path = PARAMS_OPTION,
) -> None:
    """Check the embedding/label/step tables, `feast apply` and materialize them into the online store."""
    from digiq.pipelines import features as pipeline

    params, fp = _settings(params_path, repo, variant)
    fp = fp.model_copy(update={"embeddings": str(pick(embeddings, fp.embeddings))})
    inputs = pipeline.Inputs.from_params(fp, dataset=pick(dataset, params.collect.out), labels=pick(labels, params.label.out))
    result = pipeline.materialize(inputs, pick(metrics, fp.metrics), progress=True)
    rows = ", ".join(f"{name} {count}" for name, count in result["rows"].items())
    typer.echo(f"materialized variant {result['variant']} (d = {result['dim']} per state, {result['dim_candidate']} per candidate): {rows} in {result['timings_s']['total']:.1f} s")


@app.command("get")
@handle_errors
def get(
    traj: str = typer.Option(..., "--traj", help="trajectory id"),
    step: int = typer.Option(..., "--step", help="step id"),
    candidates: bool = typer.Option(False, "--candidates", help="also read the state's K candidate actions and embeddings"),
    as_json: bool = typer.Option(False, "--json", help="print every value (full embeddings) as JSON"),
    variant: str = typer.Option(None, "--variant", help="embedding variant [params: features.variant]"),
    repo: Path = typer.Option(None, "--repo", help="Feast repository folder [params: features.repo]"),
    params_path: Path = PARAMS_OPTION,
) -> None:
    """Read one state's features (f(s), reward, done, s', ε-label; with --candidates f(s, a_k)) from the online store."""
    from digiq.pipelines import features as pipeline

    _, fp = _settings(params_path, repo, variant)
    store = pipeline.open_store(fp.repo, fp.variant)
    row = pipeline.online_state(store, traj, step, candidates=candidates)
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
        for column in ("cand_idx", "action", "embedding"):
            listing.add_column(column)
        for idx, action, vector in zip(cands["cand_idx"], cands["action"], cands["embedding"]):
            listing.add_row(str(idx), _short(action), _summary(vector))
        console.print(listing)
