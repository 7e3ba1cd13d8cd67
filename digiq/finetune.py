"""Representation fine-tuning (Digi-Q stage 1): teach the VLM to answer "will this action change the screen?".

For each labelled transition (s, a) with ε-label y ∈ {Yes, No} (:mod:`digiq.labels`), the VLM reads the prompt
of :func:`digiq.vlm.prompts.build_prompt` and answers Yes or No; :mod:`digiq.finetune_trainer` minimises the
class-weighted cross-entropy over the two answer tokens. This module prepares what it trains on:

- the examples: one prompt per labelled transition, split **by trajectory** (seeded), so no episode sits on both
  sides, and the class weights w_c = n / (2 n_c);
- the vision tower is frozen (as LLaVA-1.5 fine-tuning keeps it): its features are computed **once per distinct
  screenshot** and cached; each step runs only the projector + language model;
- what trains: LoRA adapters on the language model plus the projector (``modules_to_save``; it is random in the
  default model), or — ``mode="full"`` — every language-model and projector weight;
- bf16 runs as autocast over fp32 master weights (the compute dtype of :func:`digiq.runtime.resolve_dtype`);
- under ``accelerate launch`` (``ranks`` of several processes, :mod:`digiq.parallel`) the vision cache is computed
  in contiguous shares of whole batches and gathered.

One whole run (examples, split, vision cache, the linear-probe baseline, training, metrics) is
:func:`digiq.finetune_job.finetune`; the library knows nothing of DVC or file layouts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digiq.errors import DigiqError
from digiq.parallel import Ranks

if TYPE_CHECKING:
    import torch

    from digiq.config import FinetuneParams
    from digiq.store import Dataset
    from digiq.vlm.model import VLM
    from digiq.vlm.prompts import PageReading

YES, NO = 0, 1  # class index = position in VLM.yes_no_logits (ANSWERS = ("Yes", "No"))


# ---------------------------------------------------------------------------- examples
@dataclass
class Examples:
    """One row per labelled transition; ``image[i]`` indexes the distinct screenshots ``images``."""

    traj_ids: list[str]
    step_ids: list[int]
    kinds: list[str]
    prompts: list[str]
    actions: list[Any]  # digiq.schema.Action
    sizes: list[tuple[int, int]]  # (w, h) of each row's screenshot
    image: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n], YES / NO
    images: list[tuple[str, str]]  # distinct (relpath, sha256)

    def __len__(self) -> int:
        return len(self.labels)


def load_examples(dataset: Dataset, labels: Any, labels_path: str | Path, marker: str = "patch",
                  order: str = "image_first", reading: PageReading | None = None) -> Examples:
    """Join the label table to the dataset's steps and build one prompt per transition, reading the page's DOM as
    the checkpoint asks (``reading``: the control under a tap, the text fields' contents; default nothing).

    A label row naming a step that the dataset does not hold is a :class:`DigiqError` on the label file."""
    from digiq.envs.view import parse_elements
    from digiq.vlm.prompts import PageReading, build_prompt

    reading = reading or PageReading()
    steps = dataset.steps_df().set_index(["traj_id", "step_id"], drop=False)
    _check_labels(labels, steps, labels_path)
    rows = steps.loc[list(zip(labels["traj_id"], labels["step_id"].astype(int), strict=True))]
    image_of: dict[str, int] = {}
    images: list[tuple[str, str]] = []
    index, actions, prompts, sizes = [], [], [], []
    for row in rows.itertuples(index=False):
        sha = row.screenshot_sha256
        if sha not in image_of:
            image_of[sha] = len(images)
            images.append((row.screenshot, sha))
        index.append(image_of[sha])
        action = dataset.action(row._asdict())
        actions.append(action)
        elements = parse_elements(row.elements) if reading.reads_elements else None
        prompts.append(build_prompt(row.goal, reading.observation(row.observation, elements),  # type: ignore[arg-type]
                                    action, reading.target(action, elements),
                                    marker=marker, order=order))  # type: ignore[arg-type]
    from PIL import Image

    for rel, _sha in images:  # the PNG header only (contents are checked when the vision cache decodes them)
        path = dataset.image_path(rel)
        if not path.is_file():
            raise DigiqError("screenshot file is missing", file=path, field="screenshot")
        with Image.open(path) as img:
            sizes.append(img.size)
    return Examples(
        traj_ids=[str(t) for t in labels["traj_id"]], step_ids=[int(s) for s in labels["step_id"]],
        kinds=[str(k) for k in labels["action_kind"]], prompts=prompts, actions=actions,
        sizes=[sizes[i] for i in index], image=np.asarray(index, dtype=np.int64),
        labels=np.where(labels["label"].to_numpy() == "Yes", YES, NO).astype(np.int64), images=images,
    )


def _check_labels(labels: Any, steps: Any, labels_path: str | Path) -> None:
    if len(labels) == 0:
        raise DigiqError("the label table is empty", file=labels_path, field="label")
    bad = sorted(set(labels["label"]) - {"Yes", "No"})
    if bad:
        raise DigiqError(f"labels must be Yes or No, found {bad[:3]}", file=labels_path, field="label")
    keys = set(zip(labels["traj_id"], labels["step_id"].astype(int), strict=True))
    missing = sorted(keys - set(steps.index))
    if missing:
        traj, step = missing[0]
        raise DigiqError(f"{len(missing)} labelled step(s) are not in the dataset, e.g. traj_id={traj!r} "
                         f"step_id={step}", file=labels_path, field="step_id")


def split_by_trajectory(traj_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val): a seeded shuffle of the distinct trajectories, the first ``val_fraction`` of
    them held out (at least one on each side when there are two or more)."""
    if not 0.0 < val_fraction < 1.0:
        raise DigiqError(f"must be in (0, 1), got {val_fraction}", field="val_fraction")
    trajs = sorted(set(traj_ids))
    if len(trajs) < 2:
        raise DigiqError("need at least two trajectories to split train/validation by trajectory", field="traj_id")
    order = np.random.default_rng(seed).permutation(len(trajs))
    n_val = min(len(trajs) - 1, max(1, round(val_fraction * len(trajs))))
    held = {trajs[i] for i in order[:n_val]}
    is_val = np.array([t in held for t in traj_ids])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def class_weights(labels: np.ndarray) -> np.ndarray:
    """w_c = n / (2 n_c): both classes weigh the same in the loss (a missing class gets weight 0)."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return np.where(counts > 0, len(labels) / (2 * np.maximum(counts, 1)), 0.0)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy (mean of the per-class recalls over the classes present)."""
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in (YES, NO) if np.any(y_true == c)]
    return {"accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
            "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan")}


# ---------------------------------------------------------------------------- model
@contextlib.contextmanager
def autocast(dtype: torch.dtype, device: str = "cpu") -> Iterator[None]:
    """bf16/fp16 autocast on ``device``'s type (cpu, cuda; fp32 master weights); nothing for fp32."""
    import torch

    if dtype == torch.float32:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


def vision_cache(vlm: VLM, dataset: Dataset, images: Sequence[tuple[str, str]], dtype: torch.dtype,
                 batch_size: int = 32, progress: Callable[[int], None] | None = None,
                 ranks: Ranks | None = None) -> torch.Tensor:
    """Frozen vision features ``[n_images, n_tokens, d]`` (float32), each distinct screenshot encoded once
    (by the processes of ``ranks`` in shares of whole batches, then gathered)."""
    import torch

    ranks = ranks or Ranks()
    chunks = []
    for start in range(*ranks.span(len(images), batch_size), batch_size):
        part = [dataset.load_image(rel, sha) for rel, sha in images[start:start + batch_size]]
        with torch.no_grad(), autocast(dtype, vlm.device):
            chunks.append(vlm.vision_features(part).float().cpu())  # the cache lives in host memory
        if progress is not None:
            progress(len(part))
    return torch.cat(ranks.gather_list(chunks))


def make_trainable(vlm: VLM, config: FinetuneParams) -> Any:
    """Wrap/unfreeze ``vlm.model`` for training; the vision tower always stays frozen. Returns the model to train."""
    import torch

    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.target_modules, modules_to_save=["multi_modal_projector"])
        torch.manual_seed(config.seed)  # LoRA A matrices are random
        try:
            model = get_peft_model(vlm.model, lora)
        except ValueError as exc:
            if "target modules" not in str(exc).lower():
                raise
            raise DigiqError(f"{config.target_modules!r} matches no module; the language model's linear layers are "
                             f"named {', '.join(language_linear_names(vlm.model))}", field="target_modules") from None
    elif config.mode == "full":
        model = vlm.model
        for name, p in model.named_parameters():
            p.requires_grad_("vision_tower" not in name)
    else:
        raise DigiqError(f"unknown mode {config.mode!r} (expected lora or full)", field="mode")
    if not any(p.requires_grad for p in model.parameters()):
        raise DigiqError(f"no parameter matches {config.target_modules!r}", field="target_modules")
    for p in model.parameters():  # a bf16-stored frozen base: what trains keeps fp32 master weights
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def language_linear_names(model: Any) -> list[str]:
    """The distinct last names of the language model's linear layers (what a LoRA target regex can match)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if "language_model" in name and isinstance(module, torch.nn.Linear)})
