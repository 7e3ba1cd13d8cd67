"""`digiq embed`: frozen features f(s), f(s, a) of every state and candidate (resumable, per variant)."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)


@handle_errors
def embed(
    dataset: Path | None = typer.Option(None, "--dataset", help="dataset folder [params: collect.out]"),
    variant: str | None = typer.Option(None, "--variant", help="finetuned | off_the_shelf | no_vlm [params: embed.variant]"),
    model: Path | None = typer.Option(None, "--model", help="checkpoint folder for this variant [params: embed.models.<variant>]"),
    layer: int | None = typer.Option(None, "--layer", help="LM hidden layer read (0 = embeddings, -1 = last) [params: embed.layer]"),
    pooling: str | None = typer.Option(None, "--pooling", help="last | mean [params: embed.pooling]"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="prompts per forward pass [params: embed.batch_size]"),
    dtype: str | None = typer.Option(None, "--dtype", help="auto | float32 | bfloat16 | float16 [params: embed.dtype]"),
    candidates: Path | None = typer.Option(None, "--candidates", help="candidate table [params: embed.candidates]"),
    out: Path | None = typer.Option(None, "--out", help="root folder of <variant>/ tables [params: embed.out]"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Embed every state and candidate with the frozen VLM (or the vision tower only, variant no_vlm)."""
    from digiq.pipelines import embed as stage

    cfg = load(params)
    p = stage.embed_params(cfg)
    v = pick(variant, p.variant)
    updates = {"variant": v, "layer": pick(layer, p.layer), "pooling": pick(pooling, p.pooling),
               "batch_size": pick(batch_size, p.batch_size), "dtype": pick(dtype, p.dtype),
               "candidates": str(pick(candidates, p.candidates)), "out": str(pick(out, p.out)),
               "models": {**p.models, **({v: str(model)} if model is not None else {})}}
    p = stage.validated(stage.EmbedParams, {**p.model_dump(), **updates}, "embed")
    outcome = stage.run(pick(dataset, Path(cfg.collect.out)), p, progress=True)
    if not outcome.is_main:
        return
    m = outcome.metrics
    typer.echo(f"{m['states']} states, {m['candidates']} candidates ({m['computed_samples']} distinct samples computed, "
               f"{m['resumed_chunks']}/{m['chunks']} chunks resumed) in {m['seconds']:.1f} s = {m['samples_per_s']:.1f} samples/s; "
               f"d = {m['d_state']}/{m['d_candidate']}, {m['dtype']}, layer {m['layer']}, model {m['model_hash']}")
    typer.echo(f"wrote {outcome.out}/{{states,candidates}}.parquet, {p.metrics}/embed-{p.variant}.json")
