"""`digiq embed`: frozen features f(s), f(s, a) of every state and candidate (resumable, per variant)."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)


@handle_errors
def embed(
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
    out: Path | None = typer.Option(None, "--out", help="root folder of the <variant>/ tables"),
    variant: str | None = typer.Option(None, "--variant", help="finetuned | off_the_shelf | no_vlm"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
) -> None:
    """Embed every state and candidate with the frozen VLM (or the vision tower only, variant no_vlm)."""
    from digiq.pipelines import embed as stage

    p = load(params, overrides, {"embed.out": out, "embed.variant": variant, "embed.device": device})
    outcome = stage.run(p, progress=True)
    if not outcome.is_main:
        return
    m = outcome.metrics
    typer.echo(f"{m['states']} states, {m['candidates']} candidates ({m['computed_samples']} distinct samples computed, "
               f"{m['resumed_chunks']}/{m['chunks']} chunks resumed) in {m['seconds']:.1f} s = {m['samples_per_s']:.1f} samples/s; "
               f"d = {m['d_state']}/{m['d_candidate']}, {m['dtype']} ({m['dtype_reason']}), layer {m['layer']}, "
               f"model {m['model_hash']}")
    typer.echo(f"wrote {outcome.out}/{{states,candidates}}.parquet, {p.embed.metrics}/embed-{p.embed.variant}.json")
