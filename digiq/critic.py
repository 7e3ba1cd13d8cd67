"""The Digi-Q critic: double Q/V heads on frozen features, trained offline by TD (or MC, the ablation).

Equations (DESIGN §1; arXiv 2502.15760 §4.2). Features are frozen: f(s) [d_s], f(s, a) [d_sa].

    Q_i(s, a) = MLP_Qi(z(f(s, a))),  V_i(s) = MLP_Vi(z(f(s))),  i ∈ {1, 2};  Q̄_i, V̄_i their Polyak copies.
    z(x) = (x − μ) / σ per feature, μ, σ of the training set (``standardize``, default on; the official code feeds
    raw features). Frozen last-token features are mostly a shared offset: on the default data the mean vector has
    norm 3.76 of a typical row's 4.00, per-dimension std 0.03–0.14. Raw, the heads barely separate states; the
    critic ranked "tap Login" first on 52 % of empty login forms, 1 % standardised (docs/results.md).

    TD   y_Q = r + γ (1 − done) · min(V̄1(s'), V̄2(s'))          L_Q = Σ_i MSE(Q_i(s, a_data), y_Q)
         y_V = min(Q̄1(s, a_data), Q̄2(s, a_data))                L_V = Σ_i MSE(V_i(s), y_V)
    MC   y_Q = y_V = G(s) = Σ_t γ^t r_t  (the observed discounted return, ``mc_return``)
    θ̄ ← τθ + (1 − τ)θ̄ after every update (TD only; MC needs no target network).

    Conservative term (``cql_alpha`` = α > 0; off by default and in the paper): CQL(H) over π_β's distinct candidates,
         L_Q += α · Σ_i mean_s [ log Σ_k exp Q_i(s, a_k) − Q_i(s, a_data) ]       k over the state's valid candidates
    Q is trained only at dataset actions; this pushes down the candidates the data never shows, whose
    extrapolated values otherwise win Best-of-N's argmax (docs/results.md measures what it changes).

    A(s, a) = max(Q1(s, a), Q2(s, a)) − max(V1(s), V2(s))     (official code: max of the two heads)

Note: the official code pairs the heads (Q_i ← r + γV̄_i(s'), V_i ← Q̄_i(s, a)); we follow DESIGN §1 and
use the clipped minimum of both target heads, the usual guard against over-estimation.

Usage::

    critic, history = train_critic(transitions, CriticConfig(), log_fn=print)
    critic.save_pretrained("models/critic");  critic = DoubleCritic.from_pretrained("models/critic")
    metrics = critic_diagnostics(critic, transitions)
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from digiq.atomic import atomic_path
from digiq.errors import DigiqError
from digiq.nn import (EpochSampler, RunningMeans, Standardize, load_pretrained, load_state, map_chunks, mlp,
                      resolve_device, save_pretrained, seeded_generator, soft_update)
from digiq.progress import progress_bar

LogFn = Callable[[dict[str, float], int], None]
KIND = "digiq.critic"


class CriticConfig(BaseModel):
    """Critic hyper-parameters (defaults: official Digi-Q code where it has one)."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["td", "mc"] = Field("td", description="'td': bootstrapped targets with target nets; 'mc': regress on the discounted return")
    gamma: float = Field(0.95, ge=0.0, le=1.0, description="discount γ of the TD target (official 0.95)")
    tau: float = Field(0.1, gt=0.0, le=1.0, description="Polyak rate of the target nets, θ̄ ← τθ + (1−τ)θ̄ (official 0.1)")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate (official critic_lr 1e-3)")
    grad_clip: float = Field(0.01, gt=0.0, description="max grad norm of each head pair (official 0.01; Adam normalises the scale anyway)")
    batch_size: int = Field(128, ge=1, description="transitions per update (official 128)")
    hidden: tuple[int, ...] = Field((256, 256), description="hidden layer widths of each Q and V MLP")
    updates: int = Field(3000, ge=1, description="gradient updates (epochs = updates · batch_size / n_transitions)")
    log_every: int = Field(50, ge=1, description="updates per logged point (metrics are averaged over the window)")
    seed: int = Field(0, ge=0, description="seed for weight init and batch sampling")
    device: str = Field("auto", description="'auto' (cuda when visible), 'cpu', 'cuda', 'cuda:1', …")
    cql_alpha: float = Field(0.0, ge=0.0, description="weight α of the conservative (CQL) term over π_β's candidates; 0: off (the paper)")
    standardize: bool = Field(True, description="standardise each head's input features with the training set's mean and std (saved with the weights); False: raw features, as the official code")


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

    def __init__(self, d_s: int, d_sa: int, config: CriticConfig | None = None):
        super().__init__()
        self.config = config or CriticConfig()
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
        config, dims, state = load_pretrained(directory, kind=KIND, config_cls=CriticConfig,
                                              absent_means={"standardize": False})  # saved before the option: raw inputs
        critic = cls(dims["d_s"], dims["d_sa"], config)  # type: ignore[arg-type]
        load_state(critic, state, directory)
        return critic.to(device).eval()


def advantage(critic: DoubleCritic, s: torch.Tensor, cand_sa: torch.Tensor) -> torch.Tensor:
    """A(s, a_k) = max(Q1(s, a_k), Q2(s, a_k)) − max(V1(s), V2(s))  for s [B, d_s], cand_sa [B, K, d_sa] → [B, K].

    "Max over heads" as in the official code (``torch.maximum(q1, q2) − torch.maximum(v1, v2)``).
    """
    return map_chunks(lambda s_, sa_: critic.q_value(sa_) - critic.v_value(s_).unsqueeze(-1), s, cand_sa, device=_device_of(critic))


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

    def __init__(self, critic: DoubleCritic, config: CriticConfig):
        self.critic, self.config = critic, config
        heads = critic.online
        self.q_params = [*heads.q1.parameters(), *heads.q2.parameters()]
        self.v_params = [*heads.v1.parameters(), *heads.v2.parameters()]
        self.q_optimizer = torch.optim.Adam(self.q_params, lr=config.lr, fused=True)
        self.v_optimizer = torch.optim.Adam(self.v_params, lr=config.lr, fused=True)

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
    config: CriticConfig | None = None,
    log_fn: LogFn | None = None,
    *,
    val_data: Transitions | None = None,
    show_progress: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 500,
) -> tuple[DoubleCritic, list[dict[str, float]]]:
    """Train a :class:`DoubleCritic` for ``config.updates`` updates; returns it and the logged history.

    Every ``log_every`` updates one point (means over the window, plus ``step``, ``epoch`` and, with
    ``val_data``, held-out losses) is appended to the history and passed to ``log_fn(point, step)``.

    With ``checkpoint`` (a file), the training state is saved there atomically at the first logged point
    ``checkpoint_every`` updates after the previous save, and a run with the same config and data resumes
    from it (its past points replayed through ``log_fn``): killed and re-run, it ends with exactly the
    critic and history of an uninterrupted run.
    """
    config = config or CriticConfig()
    device = resolve_device(config.device)
    generator = seeded_generator(config.seed)
    critic = DoubleCritic(data.s.shape[1], data.sa.shape[1], config).to(device)
    trainer = CriticTrainer(critic, config)
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


def run_fingerprint(config: CriticConfig, table: Batch, val_table: Batch | None) -> str:
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


# ----------------------------------------------------------------------------------------------- diagnostics


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def candidate_q(critic: DoubleCritic, data: Transitions) -> torch.Tensor:
    """max(Q1, Q2) of every candidate [B, K] (invalid candidates: NaN)."""
    data.require("cand_sa", "cand_mask")
    q = map_chunks(critic.q_value, data.cand_sa, device=_device_of(critic))
    return q.masked_fill(~data.cand_mask.cpu(), math.nan)


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax ignoring NaN; ties go to the lowest index (so the dataset action, index 0, wins ties)."""
    filled = scores.nan_to_num(nan=-math.inf)
    is_max = filled == filled.max(dim=-1, keepdim=True).values
    return is_max.float().argmax(dim=-1)  # argmax of a 0/1 row returns the first 1


def action_sensitivity(critic: DoubleCritic, data: Transitions, q: torch.Tensor | None = None) -> dict[str, float]:
    """Does Q use the action? Spread of Q over a state's candidates vs spread of Q across states.

    - ``q_std_within_state``: mean over states (≥ 2 valid candidates) of the std of Q over that state's
      valid candidates (population std);
    - ``q_std_across_states``: std over states of the mean of Q over the state's valid candidates;
    - ``action_sensitivity`` = within / across: 0 for a critic that ignores the action;
    - ``argmax_not_dataset_frac``: states whose best candidate is not the dataset action (ties: index 0).

    ``q``: :func:`candidate_q` of ``critic`` on ``data`` when the caller has it already.
    """
    q = candidate_q(critic, data) if q is None else q
    rows = data.cand_mask.sum(dim=1) >= 2
    q_rows = q[rows]
    within = _nanstd(q_rows, dim=1).mean()
    across = q_rows.nanmean(dim=1).std(unbiased=False)
    return {
        "action_sensitivity": (within / across.clamp_min(1e-12)).item(),
        "q_std_within_state": within.item(),
        "q_std_across_states": across.item(),
        "argmax_not_dataset_frac": (first_argmax(q_rows) != 0).float().mean().item(),
        "sensitivity_states": int(rows.sum()),
    }


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    mean = x.nanmean(dim=dim, keepdim=True)
    return ((x - mean) ** 2).nanmean(dim=dim).sqrt()


def ranking_quality(critic: DoubleCritic, data: Transitions, q: torch.Tensor | None = None) -> dict[str, float]:
    """On states of successful trajectories: P[Q(s, a_data) > Q(s, a_random other valid candidate)].

    Computed exactly (the mean over all other valid candidates, not a sample); ties count ½, so a
    critic that ignores the action scores 0.5 and chance is 0.5.
    """
    data.require("cand_sa", "cand_mask", "traj_success")
    rows = data.traj_success & (data.cand_mask.sum(dim=1) >= 2)
    if not bool(rows.any()):
        return {"ranking_quality": math.nan, "ranking_states": 0}
    q = (candidate_q(critic, data) if q is None else q)[rows]
    others = data.cand_mask[rows].clone()
    others[:, 0] = False
    q0 = q[:, :1]
    wins = ((q0 > q).float() + 0.5 * (q0 == q).float()) * others
    per_state = wins.sum(dim=1) / others.sum(dim=1)
    return {"ranking_quality": per_state.mean().item(), "ranking_states": int(rows.sum())}


def behavior_agreement(critic: DoubleCritic, data: Transitions, q: torch.Tensor | None = None) -> dict[str, float]:
    """Does the critic's favourite agree with π_β's? On states with ≥ 2 valid candidates:

    - ``argmax_is_behavior_mode_frac``: the argmax-Q candidate is the one π_β draws most (``cand_count``; ties:
      lowest index for both);
    - ``argmax_draws_mean`` / ``behavior_mode_draws_mean``: π_β draws of the argmax-Q candidate / of the mode.

    A critic that keeps choosing what π_β rarely proposes is extrapolating (docs/results.md).
    """
    data.require("cand_sa", "cand_mask", "cand_count")
    rows = data.cand_mask.sum(dim=1) >= 2
    q = (candidate_q(critic, data) if q is None else q)[rows]
    counts = data.cand_count[rows].masked_fill(~data.cand_mask[rows], math.nan)
    best, mode = first_argmax(q), first_argmax(counts)
    drawn = counts.nan_to_num(0.0)
    return {
        "argmax_is_behavior_mode_frac": (best == mode).float().mean().item(),
        "argmax_draws_mean": drawn.gather(1, best[:, None]).mean().item(),
        "behavior_mode_draws_mean": drawn.gather(1, mode[:, None]).mean().item(),
    }


def v_calibration(critic: DoubleCritic, data: Transitions) -> dict[str, float]:
    """V(s) = max(V1, V2)(s) against the observed discounted return G(s): Pearson r, mean error, MAE."""
    v = map_chunks(critic.v_value, data.s, device=_device_of(critic))
    g = data.mc_return.float().cpu()
    err = v - g
    corr = torch.corrcoef(torch.stack([v, g]))[0, 1] if len(g) > 1 else torch.tensor(math.nan)
    return {"v_return_corr": corr.item(), "v_mean_error": err.mean().item(), "v_mae": err.abs().mean().item()}


def critic_diagnostics(critic: DoubleCritic, data: Transitions) -> dict[str, float]:
    """All diagnostics that ``data`` allows (candidate-based ones need ``cand_sa``; ranking needs success)."""
    out = v_calibration(critic, data)
    if data.cand_sa is not None:
        q = candidate_q(critic, data)
        out |= action_sensitivity(critic, data, q) | behavior_agreement(critic, data, q)
        if data.traj_success is not None:
            out |= ranking_quality(critic, data, q)
    return out

