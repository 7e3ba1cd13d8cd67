"""One fine-tuning run (Digi-Q stage 1) from a dataset, its ε-labels and a base VLM, scored against two baselines.

    run = finetune("data/raw", "data/labels.parquet", "models/base", params.finetune, device="cpu",
                   dtype=resolve_dtype(params.finetune.dtype, "cpu"))
    save_finetuned(run, "models/finetuned", base="models/base", card=text)

The held-out split (by trajectory) is scored three ways: the fine-tuned model's Yes/No answer, the off-the-shelf
model's own answer before any update (zero-shot), and a linear probe on the off-the-shelf model's frozen features
(class-balanced logistic regression on standardised features: what the representation holds before fine-tuning).
Under ``accelerate launch`` every process trains (:mod:`digiq.finetune`) and only the main one gets the run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digiq import finetune as F
from digiq.finetune_trainer import Trainer
from digiq.parallel import Ranks
from digiq.progress import progress_bar

if TYPE_CHECKING:
    import torch

    from digiq.config import FinetuneParams
    from digiq.runtime import ComputeDtype
    from digiq.vlm.model import VLM

# settings that change neither what is trained nor how (a checkpoint survives a change of them)
NOT_IN_FINGERPRINT = ("max_train_seconds", "out", "metrics", "live_dir", "checkpoint_dir", "device")


@dataclass
class FinetuneRun:
    metrics: dict[str, Any]
    vlm: VLM  # the trained model with the base's processor
    model: Any  # what trained: the PEFT model (LoRA) or the language model + projector (full)
    mode: str  # lora | full
    finished: bool  # False: stopped by max_train_seconds (the model is what was trained so far)


def finetune(dataset: str | Path, labels: str | Path, base: str | Path, config: FinetuneParams, *, device: str,
             dtype: ComputeDtype, ranks: Ranks | None = None, progress: bool = False,
             on_epoch: Callable[[dict[str, float]], None] | None = None, stop_after_steps: int | None = None,
             say: Callable[[str], None] = lambda _message: None) -> FinetuneRun | None:
    """Fine-tune ``base`` on ``labels`` of ``dataset`` (resuming from ``config.checkpoint_dir``).

    ``on_epoch(metrics)`` gets each epoch's validation metrics. Returns None when ``stop_after_steps`` stopped the
    run (a test hook: a checkpoint is left behind) and on the processes of `accelerate launch` other than the main.
    """
    import torch

    from digiq.labels import read_labels
    from digiq.runtime import quiet_transformers, seed_everything, set_threads
    from digiq.store import Dataset
    from digiq.vlm.load import load_vlm
    from digiq.vlm.model import VLM

    ranks = ranks or Ranks()
    started = time.perf_counter()
    set_threads()
    quiet_transformers()
    seed_everything(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    data = Dataset(dataset)
    table = read_labels(labels)
    vlm = load_vlm(base, dtype=config.base_dtype, device=device)  # trained weights stay fp32; bf16 via autocast
    examples = F.load_examples(data, table, labels, marker=config.marker, order=vlm.prompt_order, reading=vlm.reading)
    train_idx, val_idx = F.split_by_trajectory(examples.traj_ids, config.val_fraction, config.seed)
    say(f"{len(examples)} transitions ({len(train_idx)} train / {len(val_idx)} val, by trajectory), "
        f"{len(examples.images)} distinct screenshots, on {device}, compute dtype {dtype.name} ({dtype.reason})")

    timing: dict[str, Any] = {"dtype": dtype.name, "dtype_reason": dtype.reason, "device": device,
                              "threads": torch.get_num_threads(), **({"processes": ranks.num} if ranks.num > 1 else {})}
    t0 = time.perf_counter()
    with progress_bar("vision features (once per screenshot)", total=len(examples.images), enabled=progress) as bar:
        features = F.vision_cache(vlm, data, examples.images, dtype.torch, progress=bar.advance, ranks=ranks)
    timing["vision_cache_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    probe_x = probe_features(vlm, features, examples, config.probe_layer, dtype.torch, ranks=ranks)
    probe = linear_probe(probe_x, examples.labels, train_idx, val_idx, seed=config.seed)
    timing["probe_s"] = round(time.perf_counter() - t0, 2)
    say(f"linear probe (off-the-shelf, layer {config.probe_layer}): held-out balanced accuracy "
        f"{probe['balanced_accuracy']:.3f}")

    data_hash = file_digest([*data.shard_files(data.root), Path(labels)])  # what the model was trained on
    model = F.make_trainable(vlm, config)
    trained = VLM(model, vlm.processor, device=device, dtype=vlm.dtype, path=vlm.path)
    trainer = Trainer(trained, model, features, examples, train_idx, val_idx, config, dtype.torch,
                        fingerprint=run_fingerprint(config, data_hash, base), checkpoint_dir=config.checkpoint_dir,
                        ranks=ranks)
    zero_shot = trainer.evaluate(val_idx)  # the off-the-shelf model's own Yes/No answer (before any update)

    t0 = time.perf_counter()
    steps_before = trainer.state.step
    with progress_bar("fine-tuning", total=config.epochs * len(train_idx), enabled=progress) as bar:
        finished = trainer.fit(on_epoch=on_epoch, progress=bar.advance, stop_after_steps=stop_after_steps)
    train_s = time.perf_counter() - t0
    if not finished and stop_after_steps is not None:
        return None
    samples = (trainer.state.step - steps_before) * config.batch_size
    final = final_validation(trainer, finished, val_idx)
    if not ranks.is_main:
        return None
    timing.update(train_s=round(train_s, 2),
                  train_samples_per_s=round(samples / train_s, 2) if samples and train_s > 0 else None,
                  total_s=round(time.perf_counter() - started, 2))
    metrics = {
        "finetuned": {"val_" + k: v for k, v in final.items()},
        "off_the_shelf": {"zero_shot_val_" + k: v for k, v in zero_shot.items()},
        "linear_probe": {"layer": config.probe_layer, "val_accuracy": probe["accuracy"],
                         "val_balanced_accuracy": probe["balanced_accuracy"]},
        "history": trainer.state.history,
        "completed": finished,
        "prompt_order": vlm.prompt_order,
        "data": data_summary(examples, train_idx, val_idx, data_hash),
        "timing": timing,
        "params": config.model_dump(),
    }
    return FinetuneRun(metrics, trained, model, config.mode, finished)


def data_summary(examples: F.Examples, train_idx: np.ndarray, val_idx: np.ndarray, data_hash: str) -> dict[str, Any]:
    """Sizes of the split, its Yes fractions and the data's sha256 (step shards + label table)."""
    return {"transitions": len(examples), "train": int(len(train_idx)), "val": int(len(val_idx)),
            "train_trajectories": len({examples.traj_ids[i] for i in train_idx}),
            "val_trajectories": len({examples.traj_ids[i] for i in val_idx}),
            "yes_fraction_train": float(np.mean(examples.labels[train_idx] == F.YES)),
            "yes_fraction_val": float(np.mean(examples.labels[val_idx] == F.YES)),
            "distinct_screenshots": len(examples.images), "sha256": data_hash}


def final_validation(trainer: Trainer, finished: bool, val_idx: np.ndarray) -> dict[str, float]:
    """The fine-tuned model's validation metrics. A finished run's last epoch already validated these very
    weights (one full pass over the validation split): reuse it."""
    if finished and trainer.state.history:
        last = trainer.state.history[-1]
        return {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")}
    return trainer.evaluate(val_idx)


def save_finetuned(run: FinetuneRun, out: str | Path, *, base: str | Path, card: str) -> Path:
    """Write ``out`` atomically: adapter/ (LoRA, pointing at ``base``), the merged model + processor, README.md
    (``card``) and finetune.json (the held-out metrics, data and params)."""
    from digiq.atomic import atomic_path, write_json, write_text

    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        merged = run.model
        if run.mode == "lora":
            run.model.save_pretrained(tmp / "adapter")
            _point_adapter_at(tmp / "adapter", base)
            merged = run.model.merge_and_unload()
        merged.save_pretrained(tmp)
        run.vlm.processor.save_pretrained(tmp)
        write_text(tmp / "README.md", card)
        write_json(tmp / "finetune.json", {k: run.metrics[k] for k in ("finetuned", "linear_probe", "data", "params")})
    return out


def _point_adapter_at(adapter: Path, base: str | Path) -> None:
    from digiq.atomic import write_json

    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    write_json(config_path, config)


# ---------------------------------------------------------------------------- the linear probe
def probe_features(vlm: VLM, features: torch.Tensor, examples: F.Examples, layer: int, dtype: torch.dtype,
                   batch_size: int = 64, ranks: Ranks | None = None) -> np.ndarray:
    """f(s, a) of the frozen model: the last token's hidden state at ``layer`` for every example, float32 (by the
    processes of ``ranks`` in shares of whole batches, then gathered)."""
    import torch

    ranks = ranks or Ranks()
    out = []
    with torch.no_grad(), F.autocast(dtype, vlm.device):
        for start in range(*ranks.span(len(examples), batch_size), batch_size):
            rows = np.arange(start, min(start + batch_size, len(examples)))
            tokens = vlm.project(features[examples.image[rows]].to(vlm.device))
            out.append(vlm.forward_features(tokens, [examples.prompts[i] for i in rows],
                                            [examples.actions[i] for i in rows], layer=layer,
                                            image_sizes=[examples.sizes[i] for i in rows]).float().cpu().numpy())
    return np.concatenate(ranks.gather_list(out))


def linear_probe(x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                 seed: int = 0) -> dict[str, float]:
    """Class-balanced logistic regression on standardised frozen features: held-out accuracy/balanced accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(y[train_idx])) < 2:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan")}
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000,
                                                             random_state=seed))
    clf.fit(x[train_idx], y[train_idx])
    return F.classification_metrics(y[val_idx], clf.predict(x[val_idx]))


# ---------------------------------------------------------------------------- fingerprints
def run_fingerprint(config: FinetuneParams, data_hash: str, base: str | Path) -> str:
    """A checkpoint resumes only a run with the same data, base model and training settings. The base model is its
    path and its config.json, which records how it is prompted (order, what it reads off the page)."""
    settings = {k: v for k, v in config.model_dump().items() if k not in NOT_IN_FINGERPRINT}
    blob = json.dumps({"params": settings, "data": data_hash, "base": str(Path(base).resolve()),
                       "base_config": file_digest([Path(base) / "config.json"])}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_digest(paths: Sequence[str | Path]) -> str:
    """sha256 over the bytes of ``paths`` (in the given order)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
