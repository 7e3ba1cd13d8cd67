"""`digiq bench`: run the benchmarks (collection, fine-tune, extraction vs matmul peak, retrieval, critic, import)."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import handle_errors

DEFAULT_ORDER = "import,retrieval,critic,embed,finetune,collect"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


@handle_errors
def bench(
    only: str = typer.Option(DEFAULT_ORDER, "--only", help="comma-separated benchmarks, run in this order"),
    out: Path = typer.Option(Path("benchmarks/results.json"), "--out", help="results JSON (the table goes next to it as .md)"),
    quick: bool = typer.Option(False, "--quick", help="small sizes: checks the harness, not the bars"),
    stages: Path = typer.Option(Path("benchmarks/stage_profile.json"), "--stages",
                                help="per-stage profile of a dvc repro (benchmarks/stage_profile.py) to include when present"),
    root: Path = typer.Option(Path("."), "--root", help="the project folder (benchmarks/, data/, models/)"),
) -> None:
    """Run each benchmark script in turn and write benchmarks/results.json + results.md. The extraction and
    fine-tune benchmarks need the default DAG's outputs (data/raw, models/…): run `make repro` first."""
    from digiq import bench as B

    def report(name: str, entry: dict) -> None:
        status = f"failed: {entry['error']}" if "error" in entry else f"{entry['wall_s']:.0f} s"
        typer.echo(f"{name}: {status}", err=True)

    names = [n.strip() for n in only.split(",") if n.strip()]
    B.run_all(names, root.resolve(), out, quick=quick, stage_profile=stages, on_done=report)
    typer.echo(out.with_suffix(".md").read_text())
