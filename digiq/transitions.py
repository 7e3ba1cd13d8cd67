"""The offline dataset as the critic and the actor read it: frozen input features, one row per transition.

    Transitions  s = x_V(s), sa = x_Q(s, a_data), s' = x_V(s'), r, done, G(s); candidates x_Q(s, a_k) for diagnostics
                 and policy extraction (k = 0 the dataset action). x_V / x_Q are the channel concatenations that
                 ``critic.inputs`` selects (:mod:`digiq.channels`); with the VLM channel alone, f(s) and f(s, a).
    Batch        one sampled batch of plain float32 tensors on the training device (``stack_batch``: all rows).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from digiq.errors import DigiqError


@dataclass
class Transitions:
    """Frozen features of an offline dataset, one row per transition (s, a_data, r, s', done).

    Candidate fields are needed for diagnostics and policy extraction only: ``cand_sa[:, 0]`` is
    x_Q(s, a_data), ``cand_mask[b, k]`` marks valid, distinct candidates (column 0 must be valid).
    """

    s: torch.Tensor  # x_V(s) [B, d_s]
    sa: torch.Tensor  # x_Q(s, a_data) [B, d_sa]
    s_next: torch.Tensor  # x_V(s') [B, d_s]
    reward: torch.Tensor  # r [B]
    done: torch.Tensor  # 1 at the last step of an episode [B]
    mc_return: torch.Tensor  # observed discounted return G(s) [B]
    cand_sa: torch.Tensor | None = None  # x_Q(s, a_k) for K candidates [B, K, d_sa], k = 0 the dataset action
    cand_mask: torch.Tensor | None = None  # valid and distinct candidates [B, K] (bool)
    cand_count: torch.Tensor | None = None  # π_β draws each distinct candidate stands for [B, K] (default: cand_mask, 1 each)
    traj_success: torch.Tensor | None = None  # the transition's trajectory succeeded [B] (bool)
    source: str | None = None  # where the tensors came from (named in errors)

    def __post_init__(self) -> None:
        b = _check(self, "s", 2).shape[0]
        d_s, d_sa = self.s.shape[1], _check(self, "sa", 2, b).shape[1]
        _check(self, "s_next", 2, b, d_s)
        for name in ("reward", "done", "mc_return"):
            _check(self, name, 1, b)
        if self.cand_sa is not None:
            k = _check(self, "cand_sa", 3, b).shape[1]
            if self.cand_sa.shape[2] != d_sa:
                raise DigiqError(f"expected [B, K, {d_sa}] (d_sa of sa), got {list(self.cand_sa.shape)}", file=self.source, field="cand_sa")
            if self.cand_mask is None:
                self.cand_mask = torch.ones(b, k, dtype=torch.bool, device=self.cand_sa.device)
            _check(self, "cand_mask", 2, b, k, dtype=torch.bool)
            if not bool(self.cand_mask[:, 0].all()):
                raise DigiqError("column 0 (the dataset action) must be valid in every row", file=self.source, field="cand_mask")
            if self.cand_count is None:
                self.cand_count = self.cand_mask.float()
            _check(self, "cand_count", 2, b, k)
            if not bool((self.cand_count[self.cand_mask] >= 1).all()):
                raise DigiqError("every valid candidate stands for at least one draw", file=self.source, field="cand_count")
        if self.traj_success is not None:
            _check(self, "traj_success", 1, b, dtype=torch.bool)

    def __len__(self) -> int:
        return self.s.shape[0]

    @property
    def dims(self) -> dict[str, int]:
        return {"d_s": self.s.shape[1], "d_sa": self.sa.shape[1]}

    def require(self, *names: str) -> None:
        """Refuse (one DigiqError) when an optional field needed by the caller is absent."""
        for name in names:
            if getattr(self, name) is None:
                raise DigiqError("required here but not provided", file=self.source, field=name)

    def subset(self, rows: torch.Tensor) -> Transitions:
        """The rows selected by an index or boolean tensor."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Transitions(**{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in values.items()})


def _check(data: Transitions, name: str, ndim: int, *dims: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Shape / dtype / finiteness check of one field; returns it."""
    value = getattr(data, name)
    if not isinstance(value, torch.Tensor):
        raise DigiqError(f"expected a torch tensor, got {type(value).__name__}", file=data.source, field=name)
    want = list(dims) + ["*"] * (ndim - len(dims))
    if value.ndim != ndim or any(w != "*" and w != got for w, got in zip(want, value.shape)):
        raise DigiqError(f"expected shape [{', '.join(map(str, want))}], got {list(value.shape)}", file=data.source, field=name)
    if value.shape[0] == 0:
        raise DigiqError("no rows", file=data.source, field=name)
    if dtype is not None and value.dtype != dtype:
        raise DigiqError(f"expected dtype {dtype}, got {value.dtype}", file=data.source, field=name)
    if dtype is None and not (value.is_floating_point() and bool(torch.isfinite(value).all())):
        raise DigiqError("expected finite floating-point values", file=data.source, field=name)
    return value


class Batch(NamedTuple):
    """One sampled batch of transitions (plain tensors, float32, on the training device).

    The candidates are carried only when the conservative term needs them."""

    s: torch.Tensor
    sa: torch.Tensor
    s_next: torch.Tensor
    reward: torch.Tensor
    done: torch.Tensor
    mc_return: torch.Tensor
    cand_sa: torch.Tensor | None = None  # [B, K, d_sa]
    cand_mask: torch.Tensor | None = None  # [B, K] bool

    def rows(self, idx: torch.Tensor) -> Batch:
        return Batch(*(t.index_select(0, idx) if t is not None else None for t in self))


def stack_batch(data: Transitions, device: str | torch.device, *, candidates: bool = False) -> Batch:
    """All transitions as one resident float32 Batch (sampling then only indexes it); ``candidates``: with
    cand_sa and cand_mask (required then)."""
    names = Batch._fields if candidates else [f for f in Batch._fields if f not in Batch._field_defaults]
    if candidates:
        data.require("cand_sa", "cand_mask")
    return Batch(*(getattr(data, name).to(device, torch.bool if name == "cand_mask" else torch.float32).contiguous()
                   for name in names))
