"""The fine-tuning loop (Digi-Q stage 1) on cached vision features, resumable and data-parallel::

    z = (logit_Yes, logit_No)                  # the answer token's logits (VLM.yes_no_logits)
    L = - Σ_i w_{y_i} log softmax(z_i)[y_i] / Σ_i w_{y_i},      w_c = n / (2 n_c)   (class balancing)

- Each epoch's batch order comes from ``(seed, epoch)`` and the RNG state is checkpointed, so a run interrupted
  at any checkpoint and resumed ends with exactly the metrics of an uninterrupted run.
- Data-parallel under ``accelerate launch`` (``ranks`` of several processes, :mod:`digiq.parallel`): validation is
  computed in contiguous shares of whole batches and gathered; each training batch is split across the processes
  and the model is wrapped in DDP by ``Accelerator.prepare`` (gloo on CPU), the per-process loss scaled so that the
  averaged gradient is the whole batch's — the same optimizer steps as one process, up to float summation order.
  Only the main process writes checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digiq.atomic import atomic_path
from digiq.errors import DigiqError
from digiq.finetune import Examples, autocast, class_weights, classification_metrics
from digiq.parallel import Ranks

if TYPE_CHECKING:
    import torch

    from digiq.config import FinetuneParams
    from digiq.vlm.model import VLM

CHECKPOINT_FILE = "checkpoint.pt"


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


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
