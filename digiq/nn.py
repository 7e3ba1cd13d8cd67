"""Small neural-network pieces shared by the critic and the policy, written once.

- :func:`mlp` — the Q/V heads and the candidate scorer, optionally behind a :class:`Standardize` input layer;
- :func:`soft_update` — Polyak averaging of target networks, θ̄ ← τθ + (1 − τ)θ̄;
- :class:`EpochSampler` — random index batches over pre-stacked in-memory tensors (no DataLoader,
  no per-sample Python: one ``randperm`` per epoch, one ``index_select`` per tensor per batch);
- :class:`RunningMeans` — averages of logged tensors over a window, read with one ``.item()`` per key;
- :func:`save_pretrained` / :func:`load_pretrained` — a folder with ``model.safetensors`` +
  ``config.json``, written atomically and loadable from any path (no pickles, no absolute paths).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from digiq.atomic import atomic_path
from digiq.errors import DigiqError
from digiq.runtime import resolve_device, seed_everything

__all__ = [
    "EpochSampler",
    "RunningMeans",
    "Standardize",
    "load_pretrained",
    "load_state",
    "map_chunks",
    "mlp",
    "resolve_device",
    "save_pretrained",
    "seeded_generator",
    "soft_update",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class Standardize(nn.Module):
    """x ↦ (x − μ) / σ per feature, μ and σ fitted once on training inputs (buffers: saved with the weights, never
    trained, left alone by :func:`soft_update`). Frozen VLM features are mostly an offset shared by every row, with
    small variations around it; the MLP learns from the variations only once they are brought to unit scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> Standardize:
        """Set μ, σ from the rows of ``x`` [N, dim] (σ floored at ``eps``: constant features stay finite)."""
        x = x.reshape(-1, x.shape[-1]).to(self.mean.device, torch.float32)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0, unbiased=False).clamp_min(self.eps))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int = 1, *, standardize: bool = False) -> nn.Sequential:
    """[Standardize →] Linear → ReLU → … → Linear. ``hidden=()`` gives a single linear layer."""
    dims = [in_dim, *hidden]
    layers: list[nn.Module] = [Standardize(in_dim)] if standardize else []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging: θ̄ ← τθ + (1 − τ)θ̄ for every parameter (τ = 1 copies)."""
    target_params = list(target.parameters())
    torch._foreach_lerp_(target_params, list(source.parameters()), tau)  # θ̄ + τ(θ − θ̄)


@torch.no_grad()
def map_chunks(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, device: str | torch.device, chunk: int = 1024) -> torch.Tensor:
    """``fn`` over row chunks of ``tensors`` (moved to ``device``; floats as float32), concatenated on the CPU."""
    def prepared(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, torch.float32) if t.is_floating_point() else t.to(device)

    return torch.cat([fn(*(prepared(t[i : i + chunk]) for t in tensors)).cpu() for i in range(0, tensors[0].shape[0], chunk)])


def seeded_generator(seed: int) -> torch.Generator:
    """Seed the global RNGs (weight init) and return a private CPU generator for sampling."""
    seed_everything(seed)
    return torch.Generator().manual_seed(seed)


class EpochSampler:
    """Index batches over ``n`` rows: a fresh seeded permutation each epoch, sliced into batches.

    Every row is seen once per epoch; the last short batch of an epoch is topped up from the next
    permutation so that every batch has exactly ``batch_size`` rows (constant cost per update).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, device: str | torch.device = "cpu"):
        if n < 1:
            raise DigiqError("no rows to sample from", field="n")
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, torch.device(device)
        self.epoch = 0
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def next(self) -> torch.Tensor:
        """The next batch of row indices (on the sampler's device)."""
        while len(self._order) - self._pos < self.batch_size:
            fresh = torch.randperm(self.n, generator=self.generator)
            self._order = torch.cat([self._order[self._pos:], fresh])
            self._pos = 0
            self.epoch += 1
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is (generator, current permutation, position): restoring it repeats the same batches."""
        return {"generator": self.generator.get_state(), "order": self._order[self._pos:].clone(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._pos, self.epoch = state["order"], 0, int(state["epoch"])


class RunningMeans:
    """Sum detached scalar tensors per key; ``pop()`` returns their means as floats and resets.

    Keeps ``.item()`` (a device sync) out of the update loop: one per key per logging window.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
        self._count += 1

    def pop(self) -> dict[str, float]:
        means = {key: (total / max(self._count, 1)).item() for key, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


def save_pretrained(directory: str | Path, module: nn.Module, *, kind: str, config: BaseModel, dims: dict[str, int]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` atomically (replacing it)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "dims": dims, "config": config.model_dump(mode="json")}
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"kind": kind})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def load_pretrained(directory: str | Path, *, kind: str, config_cls: type[BaseModel],
                    absent_means: dict[str, Any] | None = None) -> tuple[BaseModel, dict[str, int], dict[str, torch.Tensor]]:
    """Read a folder written by :func:`save_pretrained`: (config, dims, state dict), checked.

    ``absent_means``: the value of a config key that folders saved before the key existed lack (their behaviour
    then), so that a new default does not change what an old folder loads as."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise DigiqError(f"missing (not a saved {kind} folder)", file=path)
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DigiqError(f"invalid JSON ({exc})", file=config_path) from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise DigiqError(f"expected kind {kind!r}, found {found!r}", file=config_path, field="kind")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DigiqError(f"unsupported format version {meta.get('format_version')!r}", file=config_path, field="format_version")
    try:
        saved = meta.get("config", {})
        config = config_cls.model_validate({**(absent_means or {}), **saved} if isinstance(saved, dict) else saved)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = "config." + ".".join(str(p) for p in problem["loc"])
        raise DigiqError(problem["msg"], file=config_path, field=field) from None
    dims = meta.get("dims")
    if not isinstance(dims, dict) or not all(isinstance(v, int) and v > 0 for v in dims.values()):
        raise DigiqError(f"expected positive integer dimensions, got {dims!r}", file=config_path, field="dims")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise DigiqError(f"unreadable weights ({exc})", file=weights_path) from None
    return config, dims, state


def load_state(module: nn.Module, state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """``module.load_state_dict(state)`` with names and shapes checked; mismatches → one DigiqError."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(names[:3])}" for label, names in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names)
        raise DigiqError(f"weights do not match the config ({detail})", file=Path(directory) / WEIGHTS_FILE)
    module.load_state_dict(state)
