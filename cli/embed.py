"""`digiq embed`: frozen features f(s), f(s, a) of every state and candidate (resumable, per variant)."""

from __future__ import annotations

from typing import Any

import typer

from digiq.cli.common import device, out, stage_command, variant


def register(app: typer.Typer) -> None:
    stage_command(app, "embed", embed, out("embed.out", "root folder of the <variant>/ tables"), variant("embed.variant"),
                  device("embed.device"))


def embed(params: Any) -> None:
    """Embed every state and candidate with the frozen VLM (or the vision tower only, variant no_vlm)."""
    from digiq.pipelines import embed as stage

    outcome = stage.run(params, progress=True)
    if not outcome.is_main:
        return
    m = outcome.metrics
    typer.echo(f"{m['states']} states, {m['candidates']} candidates ({m['computed_samples']} distinct samples computed, "
               f"{m['resumed_chunks']}/{m['chunks']} chunks resumed) in {m['seconds']:.1f} s = {m['samples_per_s']:.1f} samples/s; "
               f"d = {m['d_state']}/{m['d_candidate']}, {m['dtype']} ({m['dtype_reason']}), quantize {m['quantize']} "
               f"({m['quantize_reason']}), layer {m['layer']}, "
               f"model {m['model_hash']}")
    typer.echo(f"wrote {outcome.out}/{{states,candidates}}.parquet, {params.embed.metrics}/embed-{params.embed.variant}.json")
