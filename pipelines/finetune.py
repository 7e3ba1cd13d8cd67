"""DVC stage `finetune`: representation fine-tuning of the VLM on ε-labels, plus the linear-probe baseline.

Inputs: the dataset (``collect.out``), the label table (``label.out``), the base model (``model.base``).
Outputs (atomic):

    models/finetuned/            merged model (load_vlm(path) works), processor, adapter/ (LoRA mode), README.md
    metrics/finetune.json        held-out metrics of the fine-tuned model, the off-the-shelf zero-shot answer and
                                 the linear probe on frozen off-the-shelf features (same split), timings, dtype
    dvclive/finetune/            per-epoch loss, accuracy, balanced accuracy (DVC plots)
    models/finetune-ckpt/        checkpoint (weights + optimizer + step + RNG): a killed run resumes from it;
                                 removed once a finished run's outputs are written

The off-the-shelf model stays selectable for ablations: it is simply ``model.base``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from digiq.atomic import write_json
from digiq.config import FinetuneParams, Params


def run(params: Params, *, progress: bool = False, stop_after_steps: int | None = None,
        report: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Fine-tune ``model.base`` on the labels; write the model folder, metrics and DVCLive logs.

    Returns the metrics, or None when ``stop_after_steps`` stopped the run early (a checkpoint is left behind).
    Under ``accelerate launch`` the processes train data-parallel (DDP, gloo on CPU; :mod:`digiq.finetune`); only
    the main process writes the checkpoint, model, metrics and DVCLive logs, and reports; the others return None."""
    from digiq.finetune_trainer import CHECKPOINT_FILE
    from digiq.finetune_job import finetune, save_finetuned
    from digiq.parallel import Ranks
    from digiq.runtime import resolve_device, resolve_dtype
    from digiq.vlm.load import check_prompt_order

    p, base = params.finetune, params.model.base
    check_prompt_order(base, params.model.prompt_order)
    ranks = Ranks.from_environment(cpu=True if resolve_device(p.device) == "cpu" else None)  # None: the launcher's
    device = ranks.device(p.device)
    say = report if report is not None and ranks.is_main else (lambda _message: None)
    log = _EpochLog(p.live_dir, say) if ranks.is_main else None
    result = finetune(params.collect.out, params.label.out, base, p, device=device,
                      dtype=resolve_dtype(p.dtype, device, setting="finetune.dtype"), ranks=ranks,
                      progress=progress and ranks.is_main, on_epoch=log, stop_after_steps=stop_after_steps, say=say)
    if log is not None:
        log.end()
    if result is None:
        return None
    if not result.finished:
        say(f"stopped after max_train_seconds={p.max_train_seconds:g}: the model is what was trained so far")
    save_finetuned(result, p.out, base=base, card=model_card(p, base, result.metrics))
    write_json(p.metrics, result.metrics)
    if result.finished:  # a stopped run keeps it: re-running with a larger max_train_seconds continues from it
        (Path(p.checkpoint_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    return result.metrics


def model_card(p: FinetuneParams, base: str | Path, m: dict[str, Any]) -> str:
    from digiq.vlm.card import model_card as card

    ft, probe, data = m["finetuned"], m["linear_probe"], m["data"]
    params = "\n".join(f"- `{k}`: `{v}`" for k, v in p.model_dump().items())
    return card(f"""# digiq fine-tuned VLM (Digi-Q representation fine-tuning)

Base model: `{base}`. Fine-tuned ({p.mode}) to answer "will this action change the screen?" (Yes/No) on
ε-labels of visual change, class-weighted cross-entropy on the answer token. Vision tower frozen.
Prompt order: `{m['prompt_order']}` (inherited from the base model's config; read the model with the same order).
Load with `digiq.vlm.load_vlm("{p.out}")`{" or the base model plus `adapter/`" if p.mode == "lora" else ""}.

## Data
- transitions: {data['transitions']} ({data['train']} train / {data['val']} validation, split by trajectory:
  {data['train_trajectories']} / {data['val_trajectories']} trajectories)
- Yes fraction: train {data['yes_fraction_train']:.3f}, validation {data['yes_fraction_val']:.3f}
- data sha256 (step shards + label table): `{data['sha256']}`

## Held-out metrics
| model | accuracy | balanced accuracy |
|---|---|---|
| fine-tuned | {ft['val_accuracy']:.3f} | {ft['val_balanced_accuracy']:.3f} |
| linear probe on off-the-shelf features (layer {probe['layer']}) | {probe['val_accuracy']:.3f} | {probe['val_balanced_accuracy']:.3f} |
| off-the-shelf zero-shot answer | {m['off_the_shelf']['zero_shot_val_accuracy']:.3f} | {m['off_the_shelf']['zero_shot_val_balanced_accuracy']:.3f} |

Training: {m['timing']['train_s']} s, {m['timing']['train_samples_per_s']} samples/s, dtype {m['timing']['dtype']}
({m['timing']['dtype_reason']}), {m['timing']['threads']} threads{"" if m['completed'] else " — stopped early by max_train_seconds"}.

## Params
{params}
""", base_model=str(base), tags=("representation-fine-tuning", *(["lora"] if p.mode == "lora" else [])))


class _EpochLog:
    """Each epoch's metrics to DVCLive (the folder is replaced on the first epoch: a resumed run replays the
    finished epochs from its checkpoint) and one line to ``say``."""

    def __init__(self, directory: str, say: Callable[[str], None]):
        self.directory, self.say, self.live = directory, say, None

    def __call__(self, m: dict[str, float]) -> None:
        if self.live is None:
            from dvclive import Live

            shutil.rmtree(self.directory, ignore_errors=True)
            self.live = Live(dir=self.directory, save_dvc_exp=False, dvcyaml=False)
        for key, value in m.items():
            if key not in ("epoch", "step"):
                self.live.log_metric(key, value)
        self.live.next_step()
        self.say(f"epoch {int(m['epoch'])}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, "
                 f"val acc {m['val_accuracy']:.3f}, val balanced acc {m['val_balanced_accuracy']:.3f}")

    def end(self) -> None:
        if self.live is not None:
            self.live.end()
