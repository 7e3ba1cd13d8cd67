"""Representation fine-tuning (Digi-Q stage 1): teach the VLM to answer "will this action change the screen?".

For each labelled transition (s, a) with ε-label y ∈ {Yes, No} (:mod:`digiq.labels`), the VLM reads the prompt
of :func:`digiq.vlm.prompts.build_prompt` and we minimise the class-weighted cross-entropy over the two answer
tokens only::

    z = (logit_Yes, logit_No)                  # the answer token's logits (VLM.yes_no_logits)
    L = - Σ_i w_{y_i} log softmax(z_i)[y_i] / Σ_i w_{y_i},      w_c = n / (2 n_c)   (class balancing)

- The vision tower is frozen (as LLaVA-1.5 fine-tuning keeps it): its features are computed **once per distinct
  screenshot** and cached; each step runs only the projector + language model.
- What trains: LoRA adapters on the language model plus the projector (``modules_to_save``; it is random in the
  default model), or — ``mode="full"`` — every language-model and projector weight.
- Train/validation split **by trajectory** (seeded), so no episode sits on both sides.
- Each epoch's batch order comes from ``(seed, epoch)`` and the RNG state is checkpointed, so a run interrupted
  at any checkpoint and resumed ends with exactly the metrics of an uninterrupted run.
- bf16 runs as autocast over fp32 master weights (the compute dtype of :func:`digiq.runtime.resolve_dtype`).
- Data-parallel under ``accelerate launch`` (``ranks`` of several processes, :mod:`digiq.parallel`): the vision
  cache, the probe features and validation are computed in contiguous shares of whole batches and gathered; each
  training batch is split across the processes and the model is wrapped in DDP by ``Accelerator.prepare`` (gloo on
  CPU), the per-process loss scaled so that the averaged gradient is the whole batch's — the same optimizer steps
  as one process, up to float summation order. Only the main process writes checkpoints.

One whole run (examples, split, vision cache, the linear-probe baseline, training, metrics) is
:func:`digiq.finetune_job.finetune`; the library knows nothing of DVC or file layouts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digiq.atomic import atomic_path
from digiq.errors import DigiqError
from digiq.parallel import Ranks

if TYPE_CHECKING:
    import torch

    from digiq.config import FinetuneParams
    from digiq.store import Dataset
    from digiq.vlm.model import VLM
    from digiq.vlm.prompts import PageReading

YES, NO = 0, 1  # class index = position in VLM.yes_no_logits (ANSWERS = ("Yes", "No"))
CHECKPOINT_FILE = "checkpoint.pt"


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


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- training
@dataclass
class TrainState:
    """Everything a checkpoint holds besides the weights and optimizer: where we are and what we saw."""

    epoch: int = 0  # epoch in progress
    batch: int = 0  # next batch index within that epoch
    step: int = 0  # optimizer steps so far
    loss_sum: float = 0.0  # weighted loss summed over this epoch's batches so far
    loss_batches: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per finished epoch
    seconds: float = 0.0  # training wall time so far (over resumes)


class Trainer:
    """Fine-tunes ``vlm`` on cached vision features; ``fit`` resumes from ``checkpoint_dir`` when it holds a
    checkpoint with the same ``fingerprint``."""

    def __init__(self, vlm: VLM, model: Any, features: torch.Tensor, examples: Examples, train_idx: np.ndarray,
                 val_idx: np.ndarray, config: FinetuneParams, dtype: torch.dtype, *, fingerprint: str = "",
                 checkpoint_dir: str | Path | None = None, ranks: Ranks | None = None):
        import torch

        self.vlm, self.model, self.features, self.ex = vlm, model, features, examples
        self.train_idx, self.val_idx, self.config, self.dtype = train_idx, val_idx, config, dtype
        self.fingerprint = fingerprint
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.weights = torch.tensor(class_weights(examples.labels[train_idx]), dtype=torch.float32, device=vlm.device)
        self.state = TrainState()
        self.ranks = ranks or Ranks()
        self.ddp: Any = None  # the DDP-wrapped loss of a data-parallel run
        if self.ranks.num > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=torch.device(vlm.device).type == "cpu")
            loss_sum = self.ranks.module(model, lambda rows: self.loss(rows, reduction="sum"))
            self.ddp, self.optimizer = self.accelerator.prepare(loss_sum, self.optimizer)

    # -- one batch
    def logits(self, rows: np.ndarray) -> torch.Tensor:
        """Yes/No logits [B, 2] of ``rows``: projector(cached vision features) → language model."""
        tokens = self.vlm.project(self.features[self.ex.image[rows]].to(self.vlm.device))
        return self.vlm.yes_no_logits(tokens, [self.ex.prompts[i] for i in rows], [self.ex.actions[i] for i in rows],
                                      image_sizes=[self.ex.sizes[i] for i in rows], prefix_cache=False)

    def loss(self, rows: np.ndarray, reduction: str = "mean") -> torch.Tensor:
        """Class-weighted 2-way cross-entropy on the answer token (``"mean"``: Σ w ℓ / Σ w; ``"sum"``: Σ w ℓ)."""
        import torch

        target = torch.as_tensor(self.ex.labels[rows], device=self.vlm.device)
        return torch.nn.functional.cross_entropy(self.logits(rows).float(), target, weight=self.weights,
                                                 reduction=reduction)

    def train_step(self, rows: np.ndarray) -> float:
        if self.ddp is not None:
            return self.train_step_parallel(rows)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.dtype, self.vlm.device):
            loss = self.loss(rows)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def train_step_parallel(self, rows: np.ndarray) -> float:
        """One optimizer step on ``rows`` split across the processes: process r computes
        ``n · Σ_{i ∈ share_r} w_{y_i} ℓ_i / Σ_{i ∈ rows} w_{y_i}``, DDP averages the gradients over the n processes,
        so the step is that of the whole batch's weighted mean loss (a process with no share adds zero)."""
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        start, end = self.ranks.span(len(rows))
        share, scale = (rows[start:end], 1.0) if end > start else (rows[:1], 0.0)
        total_weight = float(self.weights.cpu()[self.ex.labels[rows]].sum())
        with autocast(self.dtype, self.vlm.device):
            loss = self.ddp(share) * (scale * self.ranks.num / total_weight)
        self.accelerator.backward(loss)
        self.optimizer.step()
        return sum(self.ranks.gather(float(loss.detach()))) / self.ranks.num

    def evaluate(self, rows: np.ndarray, batch_size: int = 64) -> dict[str, float]:
        """Weighted loss, accuracy and balanced accuracy on ``rows`` (no gradients, eval mode)."""
        import torch

        self.model.eval()
        parts = []
        with torch.no_grad(), autocast(self.dtype, self.vlm.device):
            for start in range(*self.ranks.span(len(rows), batch_size), batch_size):
                parts.append(self.logits(rows[start:start + batch_size]).float().cpu())
        logits = torch.cat(self.ranks.gather_list(parts))
        target = torch.as_tensor(self.ex.labels[rows])
        loss = float(torch.nn.functional.cross_entropy(logits, target, weight=self.weights.cpu()))
        pred = logits.argmax(-1).numpy()
        return {"loss": loss, **classification_metrics(self.ex.labels[rows], pred)}

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's shuffled training batches, a function of (seed, epoch) only."""
        order = np.random.default_rng([self.config.seed, epoch]).permutation(self.train_idx)
        return [order[i:i + self.config.batch_size] for i in range(0, len(order), self.config.batch_size)]

    # -- the loop
    def fit(self, on_epoch: Callable[[dict[str, float]], None] | None = None,
            progress: Callable[[int], None] | None = None, stop_after_steps: int | None = None) -> bool:
        """Train to ``config.epochs`` (resuming from the checkpoint when there is one). ``on_epoch(metrics)`` gets
        each epoch's metrics (replayed for epochs finished before a resume). Returns False when stopped early
        (``stop_after_steps``, a test hook, or ``max_train_seconds``)."""
        import torch

        self.resume()
        for past in self.state.history:
            if on_epoch is not None:
                on_epoch(past)
        started = time.perf_counter() - self.state.seconds
        while self.state.epoch < self.config.epochs:
            batches = self.epoch_batches(self.state.epoch)
            while self.state.batch < len(batches):
                loss = self.train_step(batches[self.state.batch])
                s = self.state
                s.batch, s.step, s.loss_sum, s.loss_batches = s.batch + 1, s.step + 1, s.loss_sum + loss, s.loss_batches + 1
                s.seconds = time.perf_counter() - started
                if progress is not None:
                    progress(len(batches[s.batch - 1]))
                if s.step % self.config.checkpoint_every == 0:
                    self.save()
                if stop_after_steps is not None and s.step >= stop_after_steps:
                    self.save()
                    return False
                if self.ranks.broadcast(s.seconds > self.config.max_train_seconds):  # the main process decides
                    self.save()
                    return False
            metrics = self.end_epoch()
            if on_epoch is not None:
                on_epoch(metrics)
            self.save()
        torch.set_grad_enabled(True)
        return True

    def end_epoch(self) -> dict[str, float]:
        s = self.state
        val = self.evaluate(self.val_idx)
        metrics = {"epoch": s.epoch + 1, "step": s.step, "train_loss": s.loss_sum / max(s.loss_batches, 1),
                   **{f"val_{k}": v for k, v in val.items()}}
        s.history.append(metrics)
        s.epoch, s.batch, s.loss_sum, s.loss_batches = s.epoch + 1, 0, 0.0, 0
        return metrics

    # -- checkpoints
    def save(self) -> None:
        """Trainable weights + optimizer + progress + RNG state, atomically."""
        import torch

        if self.checkpoint is None or not self.ranks.is_main:
            return
        s = self.state
        blob = {"fingerprint": self.fingerprint, "weights": trainable_state(self.model),
                "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                "progress": [s.epoch, s.batch, s.step, s.loss_sum, s.loss_batches, s.seconds],
                "history": [[list(h.keys()), [float(v) for v in h.values()]] for h in s.history]}
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.checkpoint) as tmp:
            torch.save(blob, tmp)

    def resume(self) -> bool:
        """Load the checkpoint when it exists and matches this run's fingerprint (else start fresh)."""
        import torch

        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        try:
            blob = torch.load(self.checkpoint, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint: say which file
            raise DigiqError(f"cannot read the checkpoint ({exc}); delete it to start over",
                             file=self.checkpoint) from None
        if blob.get("fingerprint") != self.fingerprint:
            return False
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in blob["weights"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"])
        if blob.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        epoch, batch, step, loss_sum, loss_batches, seconds = blob["progress"]
        self.state = TrainState(int(epoch), int(batch), int(step), float(loss_sum), int(loss_batches),
                                [dict(zip(k, v, strict=True)) for k, v in blob["history"]], float(seconds))
        return True
