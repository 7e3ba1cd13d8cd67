"""DVC stage `finetune`: representation fine-tuning of the VLM on ε-labels, plus the linear-probe baseline.

Inputs: the dataset folder, the label table, the base model folder (``model.base``). Outputs (atomic):

    models/finetuned/            merged model (load_vlm(path) works), processor, adapter/ (LoRA mode), README.md
    metrics/finetune.json        held-out metrics of the fine-tuned model, the off-the-shelf zero-shot answer and
                                 the linear probe on frozen off-the-shelf features (same split), timings
    dvclive/finetune/            per-epoch loss, accuracy, balanced accuracy (DVC plots)
    models/finetune-ckpt/        checkpoint (weights + optimizer + step + RNG): a killed run resumes from it;
                                 removed once a finished run's outputs are written

The off-the-shelf model stays selectable for ablations: it is simply ``model.base``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from digiq.atomic import atomic_path, write_json, write_text
from digiq.config import FinetuneParams


def finetune_params(params: Any) -> FinetuneParams:
    """The `finetune` section of loaded params."""
    return params.finetune


def run(dataset: str | Path, labels: str | Path, base: str | Path, p: FinetuneParams, *,
        progress: bool = False, stop_after_steps: int | None = None,
        report: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Fine-tune ``base`` on ``labels`` of ``dataset``; write the model folder, metrics and DVCLive logs.

    Returns the metrics, or None when ``stop_after_steps`` stopped the run early (a checkpoint is left behind).

    Under ``accelerate launch`` the processes train data-parallel (DDP, gloo on CPU; :mod:`digiq.finetune`); only
    the main process writes the checkpoint, model, metrics and DVCLive logs, and reports; the others return None."""
    import numpy as np
    import torch

    from digiq import finetune as F
    from digiq.labels import read_labels
    from digiq.parallel import Ranks
    from digiq.runtime import dtype_from_name, quiet_transformers, resolve_device, seed_everything, set_threads
    from digiq.store import Dataset
    from digiq.vlm.load import load_vlm

    ranks = Ranks.from_environment(cpu=True if resolve_device(p.device) == "cpu" else None)  # None: the launcher's choice
    device = ranks.device(p.device)
    say = report if report is not None and ranks.is_main else (lambda _msg: None)
    started = time.perf_counter()
    set_threads()
    quiet_transformers()
    seed_everything(p.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    dtype = dtype_from_name(p.dtype, device)
    data = Dataset(dataset)
    table = read_labels(labels)
    vlm = load_vlm(base, dtype=p.base_dtype, device=device)  # trained weights stay fp32; bf16 compute via autocast
    examples = F.load_examples(data, table, labels, marker=p.marker, order=vlm.prompt_order, reading=vlm.reading)
    train_idx, val_idx = F.split_by_trajectory(examples.traj_ids, p.val_fraction, p.seed)
    say(f"{len(examples)} transitions ({len(train_idx)} train / {len(val_idx)} val, by trajectory), "
        f"{len(examples.images)} distinct screenshots, on {device}, compute dtype {str(dtype).removeprefix('torch.')}")

    t0 = time.perf_counter()
    with _bar(progress and ranks.is_main, len(examples.images), "vision features (once per screenshot)") as tick:
        features = F.vision_cache(vlm, data, examples.images, dtype, progress=tick, ranks=ranks)
    vision_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    probe_x = F.probe_features(vlm, features, examples, p.probe_layer, dtype, ranks=ranks)
    probe = F.linear_probe(probe_x, examples.labels, train_idx, val_idx, seed=p.seed)
    probe_s = time.perf_counter() - t0
    say(f"linear probe (off-the-shelf, layer {p.probe_layer}): held-out balanced accuracy "
        f"{probe['balanced_accuracy']:.3f}")

    spec = F.TrainSpec(mode=p.mode, lora_r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                       target_modules=p.target_modules, lr=p.lr, weight_decay=p.weight_decay, epochs=p.epochs,
                       batch_size=p.batch_size, seed=p.seed, checkpoint_every=p.checkpoint_every,
                       max_train_seconds=p.max_train_seconds)
    data_hash = data_fingerprint(data, labels)
    fingerprint = _run_fingerprint(p, data_hash, base)
    model = F.make_trainable(vlm, spec)
    from digiq.vlm.model import VLM

    tvlm = VLM(model, vlm.processor, device=device, dtype=vlm.dtype, path=vlm.path)
    trainer = F.Trainer(tvlm, model, features, examples, train_idx, val_idx, spec, dtype,
                        fingerprint=fingerprint, checkpoint_dir=p.checkpoint_dir, ranks=ranks)
    zero_shot = trainer.evaluate(val_idx)  # the off-the-shelf model's own Yes/No answer (before any update)

    live = _live(p.live_dir) if ranks.is_main else None
    t0 = time.perf_counter()
    steps_before = trainer.state.step

    def on_epoch(m: dict[str, float]) -> None:
        if live is None:
            return
        for key, value in m.items():
            if key not in ("epoch", "step"):
                live.log_metric(f"{key}", value)
        live.next_step()
        say(f"epoch {int(m['epoch'])}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, "
            f"val acc {m['val_accuracy']:.3f}, val balanced acc {m['val_balanced_accuracy']:.3f}")

    total = p.epochs * len(train_idx)
    with _bar(progress and ranks.is_main, total, "fine-tuning") as tick:
        finished = trainer.fit(on_epoch=on_epoch, progress=tick, stop_after_steps=stop_after_steps)
    if live is not None:
        live.end()
    train_s = time.perf_counter() - t0
    if not finished and stop_after_steps is not None:
        return None
    samples = (trainer.state.step - steps_before) * p.batch_size
    final = final_validation(trainer, finished, val_idx)
    if not ranks.is_main:
        return None
    metrics = {
        "finetuned": {"val_" + k: v for k, v in final.items()},
        "off_the_shelf": {"zero_shot_val_" + k: v for k, v in zero_shot.items()},
        "linear_probe": {"layer": p.probe_layer, "val_accuracy": probe["accuracy"],
                         "val_balanced_accuracy": probe["balanced_accuracy"]},
        "history": trainer.state.history,
        "completed": finished,
        "prompt_order": vlm.prompt_order,
        "data": {"transitions": len(examples), "train": int(len(train_idx)), "val": int(len(val_idx)),
                 "train_trajectories": len({examples.traj_ids[i] for i in train_idx}),
                 "val_trajectories": len({examples.traj_ids[i] for i in val_idx}),
                 "yes_fraction_train": float(np.mean(examples.labels[train_idx] == F.YES)),
                 "yes_fraction_val": float(np.mean(examples.labels[val_idx] == F.YES)),
                 "distinct_screenshots": len(examples.images), "sha256": data_hash},
        "timing": {"dtype": str(dtype).removeprefix("torch."), "device": device, "threads": torch.get_num_threads(),
                   **({"processes": ranks.num} if ranks.num > 1 else {}),
                   "vision_cache_s": round(vision_s, 2), "probe_s": round(probe_s, 2),
                   "train_s": round(train_s, 2),
                   "train_samples_per_s": round(samples / train_s, 2) if samples and train_s > 0 else None,
                   "total_s": round(time.perf_counter() - started, 2)},
        "params": p.model_dump(),
    }
    if not finished:
        say(f"stopped after max_train_seconds={p.max_train_seconds:g}: the model is what was trained so far")
    save_outputs(tvlm, model, p, base, metrics)
    write_json(p.metrics, metrics)
    if finished:  # a stopped run keeps it: re-running with a larger max_train_seconds continues from it
        (Path(p.checkpoint_dir) / F.CHECKPOINT_FILE).unlink(missing_ok=True)
    return metrics


def data_fingerprint(data: Any, labels: str | Path) -> str:
    """sha256 over the dataset's step shards and the label table (what the model was trained on)."""
    from digiq import finetune as F

    return F.file_digest([*data.shard_files(data.root), Path(labels)])


def final_validation(trainer: Any, finished: bool, val_idx: Any) -> dict[str, float]:
    """The fine-tuned model's validation metrics. A finished run's last epoch already validated these very
    weights (one full pass over the validation split): reuse it."""
    if finished and trainer.state.history:
        last = trainer.state.history[-1]
        return {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")}
    return trainer.evaluate(val_idx)


def _run_fingerprint(p: FinetuneParams, data_hash: str, base: str | Path) -> str:
    """A checkpoint resumes only a run with the same data, base model and training params. The base model is its
    path and its config.json, which records how it is prompted (order, what it reads off the page)."""
    import hashlib

    from digiq.finetune import file_digest

    keys = {k: v for k, v in p.model_dump().items() if k not in ("max_train_seconds", "out", "metrics", "live_dir",
                                                                 "checkpoint_dir", "device")}
    blob = json.dumps({"params": keys, "data": data_hash, "base": str(Path(base).resolve()),
                       "base_config": file_digest([Path(base) / "config.json"])}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_outputs(vlm: Any, model: Any, p: FinetuneParams, base: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``p.out`` atomically: adapter/ (LoRA), the merged model + processor, README.md (model card)."""
    out = Path(p.out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if p.mode == "lora":
            model.save_pretrained(tmp / "adapter")
            _point_adapter_at(tmp / "adapter", base)
            merged = model.merge_and_unload()
        else:
            merged = model
        merged.save_pretrained(tmp)
        vlm.processor.save_pretrained(tmp)
        write_text(tmp / "README.md", model_card(p, base, metrics))
        write_json(tmp / "finetune.json", {k: metrics[k] for k in ("finetuned", "linear_probe", "data", "params")})
    return out


def _point_adapter_at(adapter: Path, base: str | Path) -> None:
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    write_json(config_path, config)


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

Training: {m['timing']['train_s']} s, {m['timing']['train_samples_per_s']} samples/s, dtype {m['timing']['dtype']},
{m['timing']['threads']} threads{"" if m['completed'] else " — stopped early by max_train_seconds"}.

## Params
{params}
""", base_model=str(base), tags=("representation-fine-tuning", *(["lora"] if p.mode == "lora" else [])))


def _live(directory: str) -> Any:
    from dvclive import Live

    shutil.rmtree(directory, ignore_errors=True)  # a resumed run replays the finished epochs from its checkpoint
    return Live(dir=directory, save_dvc_exp=False, dvcyaml=False)


class _bar:
    """A rich progress bar (or nothing) whose ``tick(n)`` advances it."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled, self.total, self.description = enabled, total, description
        self.progress: Any = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self.progress = Progress(transient=True)
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()


__all__ = ["FinetuneParams", "finetune_params", "run", "save_outputs", "model_card", "data_fingerprint"]
