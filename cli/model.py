"""`digiq model build|info|preset`: the embedded default VLM, a look inside any checkpoint folder, presets.

Only typer is imported at module level; torch/transformers load inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, out, seed, stage_command

app = typer.Typer(no_args_is_help=True, help="Build the default VLM; summarise a checkpoint folder.")


def build(params: Any) -> None:
    """Build the default LLaVA (pretrained DINOv2-S vision tower + MiniLM embeddings; seeded Llama layers or
    MiniLM's own)."""
    from digiq.pipelines.build_model import run

    record, m = run(params, progress=True), params.model
    typer.echo(f"wrote {m.base}: {record['parameters']:,} parameters, {m.image_size} px, seed {m.seed}, prompt order "
               f"{m.prompt_order}, {m.text_model} layers{_reading_words(m.tap_target, m.field_values)}")


stage_command(app, "build", build, out("model.base", "checkpoint folder to write, replaced atomically"),
              seed("model.seed", "seed of the random parts (decoder layers, projector)"))


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

    from digiq.params_file import dvc_set_flags, preset_overrides

    for flag, value in zip(*[iter(dvc_set_flags(preset_overrides(path, params)))] * 2, strict=True):
        typer.echo(f"{flag} {shlex.quote(value)}")
