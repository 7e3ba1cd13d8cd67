"""`digiq model build|info`: the embedded default VLM and a look inside any checkpoint folder.

Only typer is imported at module level; torch/transformers load inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick

app = typer.Typer(no_args_is_help=True, help="Build the default VLM; summarise a checkpoint folder.")


@app.command("build")
@handle_errors
def build(
    out: Path | None = typer.Option(None, "--out", help="checkpoint folder to write, replaced atomically [params: model.base]"),
    image_size: int | None = typer.Option(None, "--image-size", help="working resolution in px, a multiple of 14 (112 → 64 image tokens) [params: model.image_size]"),
    seed: int | None = typer.Option(None, "--seed", help="seed of the random parts (decoder layers, projector) [params: model.seed]"),
    prompt_order: str | None = typer.Option(None, "--prompt-order", help="image_first | state_first: screenshot before or after the state text, recorded in config.json [params: model.prompt_order]"),
    text_model: str | None = typer.Option(None, "--text-model", help="llama (seeded random layers) | minilm (all-MiniLM-L6-v2's pretrained layers, run as a decoder) [params: model.text_model]"),
    tap_target: bool | None = typer.Option(None, "--tap-target/--no-tap-target", help="tap prompts name the element under the tap (its DOM text), recorded in config.json [params: model.tap_target]"),
    field_values: bool | None = typer.Option(None, "--field-values/--no-field-values", help="the state text says what the page's text fields hold (their DOM values), recorded in config.json [params: model.field_values]"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Build the default LLaVA (pretrained DINOv2-S vision tower + MiniLM embeddings; seeded Llama layers or
    MiniLM's own)."""
    from digiq.pipelines.build_model import run

    cfg = load(params).model
    out = pick(out, Path(cfg.base))
    image_size = pick(image_size, cfg.image_size)
    seed = pick(seed, cfg.seed)
    prompt_order = pick(prompt_order, cfg.prompt_order)
    text_model = pick(text_model, cfg.text_model)
    tap_target = pick(tap_target, cfg.tap_target)
    field_values = pick(field_values, cfg.field_values)
    record = run(out, image_size=image_size, seed=seed, prompt_order=prompt_order, text_model=text_model,
                 tap_target=tap_target, field_values=field_values)
    typer.echo(f"wrote {out}: {record['parameters']:,} parameters, {image_size} px, seed {seed}, prompt order "
               f"{prompt_order}, {text_model} layers{_reading_words(tap_target, field_values)}")


def _reading_words(tap_target: bool, field_values: bool) -> str:
    return (", taps name their target" if tap_target else "") + (", the state quotes the text fields" if field_values else "")


@app.command("info")
@handle_errors
def info(
    path: Path = typer.Argument(..., help="checkpoint folder (config.json + safetensors)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Parameter count and config summary of a checkpoint folder (weights are not loaded)."""
    from digiq.vlm.load import model_info

    summary = model_info(path)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    typer.echo(f"{summary['path']}: {summary['architecture']}, {summary['parameters']:,} parameters "
               f"({', '.join(summary['dtypes'])})")
    for part in ("vision", "text"):
        typer.echo(f"  {part}: " + ", ".join(f"{k}={v}" for k, v in summary[part].items()))
    typer.echo(f"  image tokens: {summary['image_seq_length']} (feature layer {summary['vision_feature_layer']}, "
               f"strategy {summary['vision_feature_select_strategy']}, token id {summary['image_token_id']})")
    typer.echo(f"  prompt order: {summary['prompt_order']}" + _reading_words(summary["tap_target"], summary["field_values"]))
    build = summary.get("digiq_build")
    if build:
        typer.echo(f"  digiq build: seed {build['config']['seed']}, pretrained: "
                   + ", ".join(sorted(build["pretrained"])) + "; random: " + ", ".join(build["random"]))


@app.command("preset")
@handle_errors
def preset(
    path: Path = typer.Argument(..., help="preset file: a partial params.yaml, e.g. profiles/llava-1.5-7b.yaml"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Print the `dvc exp run` arguments that apply a preset, one per line, shell-quoted, after checking that
    params.yaml with the preset merged in is valid:  digiq model preset P | xargs dvc exp run -n NAME"""
    import shlex

    from digiq.config import dvc_set_flags, preset_overrides

    for flag, value in zip(*[iter(dvc_set_flags(preset_overrides(path, params)))] * 2, strict=True):
        typer.echo(f"{flag} {shlex.quote(value)}")
