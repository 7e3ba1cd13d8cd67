"""`digiq finetune`: representation fine-tuning of the VLM on ε-labels (LoRA or full), with the linear-probe
baseline on the off-the-shelf model. Re-running after an interruption resumes from the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from digiq.cli.common import PARAMS_OPTION, handle_errors, load, pick


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)


@handle_errors
def finetune(
    dataset: Path | None = typer.Option(None, "--dataset", help="dataset folder [params: collect.out]"),
    labels: Path | None = typer.Option(None, "--labels", help="ε-label table [params: label.out]"),
    base: Path | None = typer.Option(None, "--base", help="off-the-shelf model folder [params: model.base]"),
    out: Path | None = typer.Option(None, "--out", help="output model folder [params: finetune.out]"),
    mode: str | None = typer.Option(None, "--mode", help="lora or full [params: finetune.mode]"),
    epochs: int | None = typer.Option(None, "--epochs", help="passes over the training split [params: finetune.epochs]"),
    lr: float | None = typer.Option(None, "--lr", help="learning rate [params: finetune.lr]"),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, float32 or bfloat16 [params: finetune.dtype]"),
    metrics: Path | None = typer.Option(None, "--metrics", help="metrics file [params: finetune.metrics]"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Fine-tune the VLM to answer "will this action change the screen?"; write the merged model, adapter,
    model card, metrics (with the linear-probe baseline) and DVCLive plots."""
    from digiq.pipelines import finetune as stage

    cfg = load(params)
    p = stage.finetune_params(cfg)
    overrides = {"out": out, "mode": mode, "epochs": epochs, "lr": lr, "dtype": dtype, "metrics": metrics}
    p = stage.FinetuneParams.model_validate({**p.model_dump(), **{k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in overrides.items() if v is not None}})
    if base is None:  # an explicit --base is taken as it is
        from digiq.vlm.load import check_prompt_order

        check_prompt_order(cfg.model.base, cfg.model.prompt_order)
    m = stage.run(pick(dataset, Path(cfg.collect.out)), pick(labels, Path(cfg.label.out)),
                  pick(base, Path(cfg.model.base)), p, progress=True, report=typer.echo)
    if m is None:  # a non-main process of `accelerate launch` (the main one writes and reports)
        return
    ft, probe = m["finetuned"], m["linear_probe"]
    typer.echo(f"held-out balanced accuracy: fine-tuned {ft['val_balanced_accuracy']:.3f}, linear probe "
               f"{probe['val_balanced_accuracy']:.3f}; wrote {p.out}, {p.metrics}, {p.live_dir} "
               f"({m['timing']['total_s']:.0f} s)")
