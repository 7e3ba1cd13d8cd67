"""The Digi-Q critic: double Q/V heads on frozen features, trained offline by TD (or MC, the ablation).

Equations (Digi-Q, arXiv 2502.15760 §4.2). Features are frozen: f(s) [d_s], f(s, a) [d_sa].

    Q_i(s, a) = MLP_Qi(z(f(s, a))),  V_i(s) = MLP_Vi(z(f(s))),  i ∈ {1, 2};  Q̄_i, V̄_i their Polyak copies.
    z(x) = (x − μ) / σ per feature, μ, σ of the training set (``standardize``, default on; the official code feeds
    raw features). Frozen last-token features are mostly an offset shared by every row: raw, the heads barely
    separate states (docs/results.md).

    TD   y_Q = r + γ (1 − done) · min(V̄1(s'), V̄2(s'))          L_Q = Σ_i MSE(Q_i(s, a_data), y_Q)
         y_V = min(Q̄1(s, a_data), Q̄2(s, a_data))                L_V = Σ_i MSE(V_i(s), y_V)
    MC   y_Q = y_V = G(s) = Σ_t γ^t r_t  (the observed discounted return, ``mc_return``)
    θ̄ ← τθ + (1 − τ)θ̄ after every update (TD only; MC needs no target network).

    Conservative term (``cql_alpha`` = α > 0; off by default and in the paper): CQL(H) over π_β's distinct candidates,
         L_Q += α · Σ_i mean_s [ log Σ_k exp Q_i(s, a_k) − Q_i(s, a_data) ]       k over the state's valid candidates
    Q is trained only at dataset actions; this pushes down the candidates the data never shows, whose
    extrapolated values otherwise win Best-of-N's argmax (docs/results.md measures what it changes).

    A(s, a) = max(Q1(s, a), Q2(s, a)) − max(V1(s), V2(s))     (official code: max of the two heads)

Note: the official code pairs the heads (Q_i ← r + γV̄_i(s'), V_i ← Q̄_i(s, a)); here both targets take the clipped
minimum of the two target heads, the usual guard against over-estimation.

Usage::

    critic, history = train_critic(transitions, params.critic, gamma=params.gamma, seed=params.seed, log_fn=print)
    critic.save_pretrained("models/critic");  critic = DoubleCritic.from_pretrained("models/critic")

Hyper-parameters are ``digiq.config.CriticParams`` (γ and the seed are the top-level ``Params`` ones);
``critic.config`` is what ``config.json`` records of them (:data:`CriticRecord`). Diagnostics:
:mod:`digiq.critic_diagnostics`.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, create_model
from torch import nn

from digiq.atomic import atomic_path
from digiq.config import CriticParams, Params
from digiq.errors import DigiqError
from digiq.nn import (EpochSampler, RunningMeans, Standardize, load_pretrained, load_state, map_chunks, mlp,
                      resolve_device, save_pretrained, seeded_generator, soft_update)
from digiq.progress import progress_bar

LogFn = Callable[[dict[str, float], int], None]
KIND = "digiq.critic"


def record_model(name: str, section: type[BaseModel], keys: tuple[str, ...], *, top_level: tuple[str, ...] = (),
                 **more: Any) -> type[BaseModel]:
    """The model of what a saved ``config.json`` records: the ``keys`` of a params section, the ``top_level`` settings
    of ``Params`` and the ``more`` fields ((type, Field) pairs), each as declared there, and nothing else."""
    declared = [(section, key) for key in keys] + [(Params, key) for key in top_level]
    fields_ = {key: (model.model_fields[key].annotation, copy.deepcopy(model.model_fields[key])) for model, key in declared}
    return create_model(name, __config__=ConfigDict(extra="forbid", protected_namespaces=()), **fields_, **more)


SAVED = ("target", "tau", "lr", "grad_clip", "batch_size", "hidden", "updates", "log_every", "device", "cql_alpha", "standardize")
CriticRecord = record_model("CriticRecord", CriticParams, SAVED, top_level=("gamma", "seed"))


def critic_record(params: CriticParams | None = None, gamma: float | None = None, seed: int | None = None) -> BaseModel:
    """What a critic trained with ``params`` (defaults: the declared ones), ``gamma`` and ``seed`` records."""
    given = {"gamma": gamma, "seed": seed}
    return CriticRecord(**(params or CriticParams()).model_dump(include=set(SAVED)),
                        **{k: v for k, v in given.items() if v is not None})


@dataclass
class Transitions:
    """Frozen features of an offline dataset, one row per transition (s, a_data, r, s', done).

    Candidate fields are needed for diagnostics and policy extraction only: ``cand_sa[:, 0]`` is
    f(s, a_data), ``cand_mask[b, k]`` marks valid, distinct candidates (column 0 must be valid).
    """

    s: torch.Tensor  # f(s) [B, d_s]
    sa: torch.Tensor  # f(s, a_data) [B, d_sa]
    s_next: torch.Tensor  # f(s') [B, d_s]
    reward: torch.Tensor  # r [B]
    done: torch.Tensor  # 1 at the last step of an episode [B]
    mc_return: torch.Tensor  # observed discounted return G(s) [B]
    cand_sa: torch.Tensor | None = None  # f(s, a_k) for K candidates [B, K, d_sa], k = 0 the dataset action
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


class QVHeads(nn.Module):
    """Q1, Q2 over f(s, a) and V1, V2 over f(s): four independent MLPs with a scalar output."""

    def __init__(self, d_s: int, d_sa: int, hidden: tuple[int, ...], standardize: bool = False):
        super().__init__()
        self.q1, self.q2 = mlp(d_sa, hidden, standardize=standardize), mlp(d_sa, hidden, standardize=standardize)
        self.v1, self.v2 = mlp(d_s, hidden, standardize=standardize), mlp(d_s, hidden, standardize=standardize)

    def fit_standardization(self, s: torch.Tensor, sa: torch.Tensor) -> None:
        """Fit the input layers (when ``standardize``): Q heads on f(s, a_data), V heads on f(s)."""
        for head, x in ((self.q1, sa), (self.q2, sa), (self.v1, s), (self.v2, s)):
            if isinstance(head[0], Standardize):
                head[0].fit(x)

    def q(self, sa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)

    def v(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.v1(s).squeeze(-1), self.v2(s).squeeze(-1)


class DoubleCritic(nn.Module):
    """Online heads (trained) + target heads (Polyak copies, never trained by gradient)."""

    def __init__(self, d_s: int, d_sa: int, params: CriticParams | None = None, *, gamma: float | None = None,
                 seed: int | None = None):
        super().__init__()
        self.config = critic_record(params, gamma, seed)
        self.d_s, self.d_sa = d_s, d_sa
        self.online = QVHeads(d_s, d_sa, self.config.hidden, self.config.standardize)
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    def fit_standardization(self, s: torch.Tensor, sa: torch.Tensor) -> None:
        """Fit the online heads' input layers on the training features, and give the target heads the same."""
        self.online.fit_standardization(s, sa)
        self.target.fit_standardization(s, sa)

    @torch.no_grad()
    def q_value(self, sa: torch.Tensor) -> torch.Tensor:
        """max(Q1, Q2)(f(s, a)), any leading shape."""
        return torch.maximum(*self.online.q(sa))

    @torch.no_grad()
    def v_value(self, s: torch.Tensor) -> torch.Tensor:
        """max(V1, V2)(f(s))."""
        return torch.maximum(*self.online.v(s))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write weights (online + target) and config to ``directory`` (atomic; loadable from any path)."""
        return save_pretrained(directory, self, kind=KIND, config=self.config, dims={"d_s": self.d_s, "d_sa": self.d_sa})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> DoubleCritic:
        config, dims, state = load_pretrained(directory, kind=KIND, config_cls=CriticRecord,
                                              absent_means={"standardize": False})  # saved before the option: raw inputs
        params = CriticParams(**config.model_dump(include=set(SAVED)))
        critic = cls(dims["d_s"], dims["d_sa"], params, gamma=config.gamma, seed=config.seed)
        load_state(critic, state, directory)
        return critic.to(device).eval()


def advantage(critic: DoubleCritic, s: torch.Tensor, cand_sa: torch.Tensor) -> torch.Tensor:
    """A(s, a_k) = max(Q1(s, a_k), Q2(s, a_k)) − max(V1(s), V2(s))  for s [B, d_s], cand_sa [B, K, d_sa] → [B, K].

    "Max over heads" as in the official code (``torch.maximum(q1, q2) − torch.maximum(v1, v2)``).
    """
    return map_chunks(lambda s_, sa_: critic.q_value(sa_) - critic.v_value(s_).unsqueeze(-1), s, cand_sa, device=device_of(critic))


# ----------------------------------------------------------------------------------------------- targets


@torch.no_grad()
def td_q_target(target: QVHeads, batch: Batch, gamma: float) -> torch.Tensor:
    """y_Q = r + γ (1 − done) · min(V̄1(s'), V̄2(s'))."""
    v1, v2 = target.v(batch.s_next)
    return batch.reward + gamma * (1.0 - batch.done) * torch.minimum(v1, v2)


def conservative_gap(q_head: nn.Module, batch: Batch) -> torch.Tensor:
    """mean_s [ log Σ_k exp Q(s, a_k) − Q(s, a_data) ] over each state's valid candidates (CQL(H); ≥ 0, as
    column 0 is the dataset action). Q is evaluated only at valid candidates (≈ 11 of 64 per state here)."""
    mask = batch.cand_mask
    q = torch.full(mask.shape, -math.inf, dtype=batch.sa.dtype, device=mask.device)
    q = q.masked_scatter(mask, q_head(batch.cand_sa[mask]).squeeze(-1))
    return (torch.logsumexp(q, dim=1) - q[:, 0]).mean()


@torch.no_grad()
def td_v_target(target: QVHeads, batch: Batch) -> torch.Tensor:
    """y_V = min(Q̄1(s, a_data), Q̄2(s, a_data))."""
    return torch.minimum(*target.q(batch.sa))


# ----------------------------------------------------------------------------------------------- training


class CriticTrainer:
    """One update = ``_update_q`` + ``_update_v`` (+ Polyak step); metrics go into one dict."""

    def __init__(self, critic: DoubleCritic):
        self.critic, self.config = critic, critic.config
        heads = critic.online
        self.q_params = [*heads.q1.parameters(), *heads.q2.parameters()]
        self.v_params = [*heads.v1.parameters(), *heads.v2.parameters()]
        self.q_optimizer = torch.optim.Adam(self.q_params, lr=self.config.lr, fused=True)
        self.v_optimizer = torch.optim.Adam(self.v_params, lr=self.config.lr, fused=True)

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        log: dict[str, torch.Tensor] = {}
        self._update_q(batch, log)
        self._update_v(batch, log)
        if self.config.target == "td":
            soft_update(self.critic.target, self.critic.online, self.config.tau)
        return log

    def _update_q(self, batch: Batch, log: dict[str, torch.Tensor]) -> None:
        y = td_q_target(self.critic.target, batch, self.config.gamma) if self.config.target == "td" else batch.mc_return
        q1, q2 = self.critic.online.q(batch.sa)
        loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        if self.config.cql_alpha > 0:
            gap = conservative_gap(self.critic.online.q1, batch) + conservative_gap(self.critic.online.q2, batch)
            loss = loss + self.config.cql_alpha * gap
            log["cql_gap"] = gap / 2
        log["q_grad_norm"] = self._step(self.q_optimizer, self.q_params, loss)
        log.update(q_loss=loss, q_mean=q1.mean(), td_error=(q1 - y).abs().mean(), q_target_mean=y.mean())

    def _update_v(self, batch: Batch, log: dict[str, torch.Tensor]) -> None:
        y = td_v_target(self.critic.target, batch) if self.config.target == "td" else batch.mc_return
        v1, v2 = self.critic.online.v(batch.s)
        loss = F.mse_loss(v1, y) + F.mse_loss(v2, y)
        log["v_grad_norm"] = self._step(self.v_optimizer, self.v_params, loss)
        log.update(v_loss=loss, v_mean=v1.mean(), v_target_mean=y.mean())

    def _step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=True)
        optimizer.step()
        return grad_norm

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Q/V losses on held-out data against the current targets (no update)."""
        y_q = td_q_target(self.critic.target, batch, self.config.gamma) if self.config.target == "td" else batch.mc_return
        y_v = td_v_target(self.critic.target, batch) if self.config.target == "td" else batch.mc_return
        (q1, q2), (v1, v2) = self.critic.online.q(batch.sa), self.critic.online.v(batch.s)
        return {"val_q_loss": F.mse_loss(q1, y_q) + F.mse_loss(q2, y_q), "val_v_loss": F.mse_loss(v1, y_v) + F.mse_loss(v2, y_v)}


def stack_batch(data: Transitions, device: str | torch.device, *, candidates: bool = False) -> Batch:
    """All transitions as one resident float32 Batch (sampling then only indexes it); ``candidates``: with
    cand_sa and cand_mask (required then)."""
    names = Batch._fields if candidates else [f for f in Batch._fields if f not in Batch._field_defaults]
    if candidates:
        data.require("cand_sa", "cand_mask")
    return Batch(*(getattr(data, name).to(device, torch.bool if name == "cand_mask" else torch.float32).contiguous()
                   for name in names))


def train_critic(
    data: Transitions,
    params: CriticParams | None = None,
    log_fn: LogFn | None = None,
    *,
    gamma: float | None = None,
    seed: int | None = None,
    val_data: Transitions | None = None,
    show_progress: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 500,
) -> tuple[DoubleCritic, list[dict[str, float]]]:
    """Train a :class:`DoubleCritic` for ``params.updates`` updates (discount ``gamma``, seed ``seed``; None: the
    declared defaults); returns it and the logged history.

    Every ``log_every`` updates one point (means over the window, plus ``step``, ``epoch`` and, with
    ``val_data``, held-out losses) is appended to the history and passed to ``log_fn(point, step)``.

    With ``checkpoint`` (a file), the training state is saved there atomically at the first logged point
    ``checkpoint_every`` updates after the previous save, and a run with the same config and data resumes
    from it (its past points replayed through ``log_fn``): killed and re-run, it ends with exactly the
    critic and history of an uninterrupted run.
    """
    config = critic_record(params, gamma, seed)
    device = resolve_device(config.device)
    generator = seeded_generator(config.seed)  # before the weights are drawn
    critic = DoubleCritic(data.s.shape[1], data.sa.shape[1], params, gamma=config.gamma, seed=config.seed).to(device)
    trainer = CriticTrainer(critic)
    table = stack_batch(data, device, candidates=config.cql_alpha > 0)
    critic.fit_standardization(table.s, table.sa)
    val_table = stack_batch(val_data, device) if val_data is not None else None
    sampler = EpochSampler(len(data), config.batch_size, generator, device)
    window, history = RunningMeans(), []
    saver = CriticCheckpoint(checkpoint, run_fingerprint(config, table, val_table)) if checkpoint is not None else None
    done = saver.resume(trainer, sampler, history) if saver is not None else 0
    for past in history:
        if log_fn is not None:
            log_fn(past, int(past["step"]))
    saved = done
    with progress_bar(f"critic ({config.target})", config.updates, enabled=show_progress) as bar:
        bar.advance(done)
        for step in range(done + 1, config.updates + 1):
            idx = sampler.next()
            window.add(trainer.update(table.rows(idx)))
            bar.advance()
            if step % config.log_every == 0 or step == config.updates:
                point = {"step": step, "epoch": step * config.batch_size / len(data), **window.pop()}
                if val_table is not None:
                    point.update({k: v.item() for k, v in trainer.evaluate(val_table).items()})
                history.append(point)
                if log_fn is not None:
                    log_fn(point, step)
                if saver is not None and step - saved >= checkpoint_every and step < config.updates:
                    saver.save(step, trainer, sampler, history)  # the window is empty here: nothing else to keep
                    saved = step
    return critic.eval(), history


def run_fingerprint(config: BaseModel, table: Batch, val_table: Batch | None) -> str:
    """sha256 of the config and the training (and validation) tensors: a checkpoint resumes only its own run."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    for tensor in (t for t in (*table, *(val_table or ())) if t is not None):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class CriticCheckpoint:
    """The training state of :func:`train_critic` in one file (weights, target nets, optimizers, sampler, RNG,
    history), written atomically; read back only by a run with the same fingerprint."""

    def __init__(self, path: str | Path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def save(self, step: int, trainer: CriticTrainer, sampler: EpochSampler, history: list[dict[str, float]]) -> None:
        blob = {"fingerprint": self.fingerprint, "step": step, "critic": trainer.critic.state_dict(),
                "q_optimizer": trainer.q_optimizer.state_dict(), "v_optimizer": trainer.v_optimizer.state_dict(),
                "sampler": sampler.state_dict(), "rng": torch.get_rng_state(), "history": history}
        with atomic_path(self.path) as tmp:
            torch.save(blob, tmp)

    def resume(self, trainer: CriticTrainer, sampler: EpochSampler, history: list[dict[str, float]]) -> int:
        """Load the checkpoint into ``trainer``, ``sampler`` and ``history`` when it is this run's; the updates done."""
        if not self.path.is_file():
            return 0
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint: say which file
            raise DigiqError(f"cannot read the critic checkpoint ({exc}); delete it to start over", file=self.path) from None
        if blob.get("fingerprint") != self.fingerprint:
            return 0
        trainer.critic.load_state_dict(blob["critic"])
        trainer.q_optimizer.load_state_dict(blob["q_optimizer"])
        trainer.v_optimizer.load_state_dict(blob["v_optimizer"])
        sampler.load_state_dict(blob["sampler"])
        torch.set_rng_state(blob["rng"])
        history.extend(blob["history"])
        return int(blob["step"])


# ----------------------------------------------------------------------------------------------- helpers


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax ignoring NaN; ties go to the lowest index (so the dataset action, index 0, wins ties)."""
    filled = scores.nan_to_num(nan=-math.inf)
    is_max = filled == filled.max(dim=-1, keepdim=True).values
    return is_max.float().argmax(dim=-1)  # argmax of a 0/1 row returns the first 1
