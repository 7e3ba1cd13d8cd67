"""`digiq finetune`: representation fine-tuning of the VLM on ε-labels (LoRA or full), with the linear-probe
baseline on the off-the-shelf model. Re-running after an interruption resumes from the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, SET_OPTION, handle_errors, load


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)


@handle_errors
def finetune(
    params: Path = PARAMS_OPTION,
    overrides: list[str] | None = SET_OPTION,
    out: Path | None = typer.Option(None, "--out", help="output model folder"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Fine-tune the VLM to answer "will this action change the screen?"; write the merged model, adapter,
    model card, metrics (with the linear-probe baseline) and DVCLive plots."""
    from digiq.pipelines import finetune as stage

    p = load(params, overrides, {"finetune.out": out, "finetune.device": device})
    m = stage.run(p, progress=True, report=typer.echo)
    if m is None:  # a non-main process of `accelerate launch` (the main one writes and reports)
        return
    ft, probe = m["finetuned"], m["linear_probe"]
    typer.echo(f"held-out balanced accuracy: fine-tuned {ft['val_balanced_accuracy']:.3f}, linear probe "
               f"{probe['val_balanced_accuracy']:.3f}; wrote {p.finetune.out}, {p.finetune.metrics}, "
               f"{p.finetune.live_dir} ({m['timing']['total_s']:.0f} s)")
