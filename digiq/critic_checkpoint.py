"""The resumable state of critic training: one file for all the runs of a stage (one per learning rate of the grid).

Each run's state sits under its fingerprint (the sha256 of its config and its training and held-out tensors): the
online and target heads, both optimizers, the batch sampler, the torch RNG, the logged history and the best held-out
point so far (step, loss and its weights), so that a run killed and re-run ends exactly as an uninterrupted one,
including which weights best-val selection keeps. A finished run's state stays in the file until the stage removes it,
so that a grid killed in its second run does not train the first again. The file is replaced atomically.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from digiq.atomic import atomic_path
from digiq.errors import DigiqError

if TYPE_CHECKING:
    from torch import nn

    from digiq.critic import CriticTrainer
    from digiq.nn import EpochSampler
    from digiq.transitions import Batch


def run_fingerprint(config: BaseModel, table: Batch, val_table: Batch | None) -> str:
    """sha256 of the config and the training (and validation) tensors: a checkpoint resumes only its own run."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    for tensor in (t for t in (*table, *(val_table or ())) if t is not None):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class BestPoint:
    """The logged point with the lowest held-out error so far (the earliest on ties) and a copy of the critic's weights
    (online and target heads) at that point."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.score = float("inf")
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, step: int, score: float, critic: nn.Module) -> None:
        if score < self.score:
            self.step, self.score = step, score
            self.state = {k: v.detach().clone() for k, v in critic.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "score": self.score, "state": self.state}

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        self.step, self.score, self.state = blob["step"], blob["score"], blob["state"]


class CriticCheckpoint:
    """One checkpoint file holding the runs' states by fingerprint (see the module docstring).

    Runs this process neither resumed nor saved (another config's, an older data version's) are dropped at the next
    save."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._runs: dict[str, dict[str, Any]] | None = None
        self._kept: set[str] = set()

    def _stored(self) -> dict[str, dict[str, Any]]:
        if self._runs is None:
            self._runs = {}
            if self.path.is_file():
                try:
                    blob = torch.load(self.path, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint: say which file
                    raise DigiqError(f"cannot read the critic checkpoint ({exc}); delete it to start over", file=self.path) from None
                self._runs = blob.get("runs", {}) if isinstance(blob, dict) else {}
        return self._runs

    def steps(self) -> dict[str, int]:
        """The updates done of every stored run, by fingerprint."""
        return {fingerprint: int(run["step"]) for fingerprint, run in self._stored().items()}

    def save(self, fingerprint: str, step: int, trainer: CriticTrainer, sampler: EpochSampler,
             history: list[dict[str, float]], best: BestPoint) -> None:
        runs = self._stored()
        runs[fingerprint] = {"step": step, "critic": trainer.critic.state_dict(), "q_optimizer": trainer.q_optimizer.state_dict(),
                             "v_optimizer": trainer.v_optimizer.state_dict(), "sampler": sampler.state_dict(),
                             "rng": torch.get_rng_state(), "history": list(history), "best": best.state_dict()}
        self._kept.add(fingerprint)
        with atomic_path(self.path) as tmp:
            torch.save({"runs": {fp: runs[fp] for fp in self._kept}}, tmp)

    def resume(self, fingerprint: str, trainer: CriticTrainer, sampler: EpochSampler, history: list[dict[str, float]],
               best: BestPoint) -> int:
        """Load the run stored under ``fingerprint`` into the trainer, sampler, history and best point; the updates
        done (0 when the file holds no such run)."""
        run = self._stored().get(fingerprint)
        if run is None:
            return 0
        trainer.critic.load_state_dict(run["critic"])
        trainer.q_optimizer.load_state_dict(run["q_optimizer"])
        trainer.v_optimizer.load_state_dict(run["v_optimizer"])
        sampler.load_state_dict(run["sampler"])
        torch.set_rng_state(run["rng"])
        history.extend(run["history"])
        best.load_state_dict(run["best"])
        self._kept.add(fingerprint)
        return int(run["step"])
