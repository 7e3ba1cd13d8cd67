"""`digiq finetune`: representation fine-tuning of the VLM on ε-labels (LoRA or full), with the linear-probe
baseline on the off-the-shelf model. Re-running after an interruption resumes from the last checkpoint."""

from __future__ import annotations

from typing import Any

import typer

from digiq.cli.common import device, out, stage_command


def register(app: typer.Typer) -> None:
    stage_command(app, "finetune", finetune, out("finetune.out", "output model folder"), device("finetune.device"))


def finetune(params: Any) -> None:
    """Fine-tune the VLM to answer "will this action change the screen?"; write the merged model, adapter,
    model card, metrics (with the linear-probe baseline) and DVCLive plots."""
    from digiq.pipelines import finetune as stage

    m = stage.run(params, progress=True, report=typer.echo)
    if m is None:  # a non-main process of `accelerate launch` (the main one writes and reports)
        return
    ft, probe, p = m["finetuned"], m["linear_probe"], params.finetune
    typer.echo(f"held-out balanced accuracy: fine-tuned {ft['val_balanced_accuracy']:.3f}, linear probe "
               f"{probe['val_balanced_accuracy']:.3f}; wrote {p.out}, {p.metrics}, {p.live_dir} ({m['timing']['total_s']:.0f} s)")
