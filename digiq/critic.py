"""The Digi-Q critic: double Q/V heads on frozen features, trained offline by TD (or MC, the ablation).

Equations (Digi-Q, arXiv 2502.15760 §4.2). Inputs are frozen: x_V(s) [d_s], x_Q(s, a) [d_sa], the channel
concatenations that ``critic.inputs`` selects (:mod:`digiq.channels`; the VLM channel alone: f(s), f(s, a)).

    Q_i(s, a) = MLP_Qi(z(x_Q(s, a))),  V_i(s) = MLP_Vi(z(x_V(s))),  i ∈ {1, 2};  Q̄_i, V̄_i their Polyak copies.
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

Which weights are kept (``select``). Every ``log_every`` updates two held-out errors are measured on the rows of
held-out trajectories (G their observed discounted returns; Q = max(Q1, Q2), V = max(V1, V2), what A reads):

    E_ret(t) = mean (Q(s, a_data) − G)² + mean (V(s) − G)²                         ``val_return_mse``
    L_val(t) = Σ_i MSE(Q_i, y_Q(t)) + Σ_i MSE(V_i, y_V(t))   y(t) from the target heads at t      ``val_loss``

``best_return`` (the default) keeps the online and target heads of the logged point with the lowest E_ret,
``best_td`` of the lowest L_val (the official trainer's validation loss), ``last`` the final ones; ties: the earliest.
Why E_ret: for any Q, E[(Q(s, a) − G)²] = E[(Q(s, a) − Q^β(s, a))²] + E[Var(G | s, a)], and the second term does not
depend on the critic, so E_ret ranks weights by their distance from π_β's values Q^β = E[G | s, a], V^β = E[G | s],
which TD on the dataset actions estimates; it is comparable across updates and across runs (the learning-rate grid,
:mod:`digiq.critic_grid`, uses it too). L_val is measured against the run's own target heads: heads that have barely
left their near-zero start agree with their own targets and score lowest, so its minimum can sit at a critic that has
learnt nearly nothing (tests/test_critic_selection.py builds such a run); across runs its targets differ and it is not
comparable at all. It is still logged, as the official validation curve.

Note: the official code pairs the heads (Q_i ← r + γV̄_i(s'), V_i ← Q̄_i(s, a)); here both targets take the clipped
minimum of the two target heads, the usual guard against over-estimation.

Usage::

    critic, history = train_critic(transitions, params.critic, gamma=params.gamma, seed=params.seed, val_data=held_out)
    critic.save_pretrained("models/critic");  critic = DoubleCritic.from_pretrained("models/critic")

Hyper-parameters are ``digiq.config.CriticParams`` (γ and the seed are the top-level ``Params`` ones);
``critic.config`` is what ``config.json`` records of them (:data:`CriticRecord`: the settings, the learning rate
trained with and the kept step). The learning-rate grid: :mod:`digiq.critic_grid`; checkpoints:
:mod:`digiq.critic_checkpoint`; diagnostics: :mod:`digiq.critic_diagnostics`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, create_model
from torch import nn

from digiq.config import CriticParams, Params
from digiq.critic_checkpoint import BestPoint, CriticCheckpoint, run_fingerprint
from digiq.nn import (EpochSampler, RunningMeans, Standardize, load_pretrained, load_state, map_chunks, mlp,
                      resolve_device, save_pretrained, seeded_generator, soft_update)
from digiq.progress import progress_bar
from digiq.transitions import Batch, Transitions, stack_batch

LogFn = Callable[[dict[str, float], int], None]
KIND = "digiq.critic"


def record_model(name: str, section: type[BaseModel], keys: tuple[str, ...], *, top_level: tuple[str, ...] = (),
                 **more: Any) -> type[BaseModel]:
    """The model of what a saved ``config.json`` records: the ``keys`` of a params section, the ``top_level`` settings
    of ``Params`` and the ``more`` fields ((type, Field) pairs), each as declared there, and nothing else."""
    declared = [(section, key) for key in keys] + [(Params, key) for key in top_level]
    fields_ = {key: (model.model_fields[key].annotation, copy.deepcopy(model.model_fields[key])) for model, key in declared}
    return create_model(name, __config__=ConfigDict(extra="forbid", protected_namespaces=()), **fields_, **more)


SAVED = ("target", "tau", "grad_clip", "batch_size", "hidden", "updates", "log_every", "device", "cql_alpha", "standardize",
         "inputs", "select")
CriticRecord = record_model(
    "CriticRecord", CriticParams, SAVED, top_level=("gamma", "seed"),
    lr=(float, Field(gt=0, description="the Adam learning rate this critic trained with (one of critic.lrs)")),
    selected_step=(int | None, Field(None, description="the update whose weights were kept (None: not trained)")),
    selected_val_loss=(float | None, Field(None, description="held-out TD loss L_val at the kept update (None: no held-out data)")),
    selected_return_mse=(float | None, Field(None, description="held-out return error E_ret at the kept update (None: no held-out data)")),
)
# what folders saved before an option existed were trained with
ABSENT_MEANS = {"standardize": False, "inputs": {"q": ["vlm"], "v": ["vlm"]}, "select": "last"}


def critic_record(params: CriticParams | None = None, gamma: float | None = None, seed: int | None = None,
                  lr: float | None = None) -> BaseModel:
    """What a critic trained with ``params`` (defaults: the declared ones), ``gamma``, ``seed`` and learning rate ``lr``
    (None: the first of ``params.lrs``) records."""
    params = params or CriticParams()
    given = {"gamma": gamma, "seed": seed}
    return CriticRecord(**params.model_dump(include=set(SAVED)), lr=params.lrs[0] if lr is None else lr,
                        **{k: v for k, v in given.items() if v is not None})


class QVHeads(nn.Module):
    """Q1, Q2 over x_Q(s, a) and V1, V2 over x_V(s): four independent MLPs with a scalar output."""

    def __init__(self, d_s: int, d_sa: int, hidden: tuple[int, ...], standardize: bool = False):
        super().__init__()
        self.q1, self.q2 = mlp(d_sa, hidden, standardize=standardize), mlp(d_sa, hidden, standardize=standardize)
        self.v1, self.v2 = mlp(d_s, hidden, standardize=standardize), mlp(d_s, hidden, standardize=standardize)

    def fit_standardization(self, s: torch.Tensor, sa: torch.Tensor) -> None:
        """Fit the input layers (when ``standardize``): Q heads on x_Q(s, a_data), V heads on x_V(s)."""
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
                 seed: int | None = None, lr: float | None = None):
        super().__init__()
        self.config = critic_record(params, gamma, seed, lr)
        self.d_s, self.d_sa = d_s, d_sa
        self.online = QVHeads(d_s, d_sa, self.config.hidden, self.config.standardize)
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    def fit_standardization(self, s: torch.Tensor, sa: torch.Tensor) -> None:
        """Fit the online heads' input layers on the training features, and give the target heads the same."""
        self.online.fit_standardization(s, sa)
        self.target.fit_standardization(s, sa)

    @torch.no_grad()
    def q_value(self, sa: torch.Tensor) -> torch.Tensor:
        """max(Q1, Q2)(x_Q(s, a)), any leading shape."""
        return torch.maximum(*self.online.q(sa))

    @torch.no_grad()
    def v_value(self, s: torch.Tensor) -> torch.Tensor:
        """max(V1, V2)(x_V(s))."""
        return torch.maximum(*self.online.v(s))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write weights (online + target) and config to ``directory`` (atomic; loadable from any path)."""
        return save_pretrained(directory, self, kind=KIND, config=self.config, dims={"d_s": self.d_s, "d_sa": self.d_sa})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> DoubleCritic:
        config, dims, state = load_pretrained(directory, kind=KIND, config_cls=CriticRecord, absent_means=ABSENT_MEANS)
        params = CriticParams(**config.model_dump(include=set(SAVED)))
        critic = cls(dims["d_s"], dims["d_sa"], params, gamma=config.gamma, seed=config.seed, lr=config.lr)
        critic.config = config
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
        """Q/V losses on held-out data against the current targets, and the return error E_ret (no update)."""
        y_q = td_q_target(self.critic.target, batch, self.config.gamma) if self.config.target == "td" else batch.mc_return
        y_v = td_v_target(self.critic.target, batch) if self.config.target == "td" else batch.mc_return
        (q1, q2), (v1, v2) = self.critic.online.q(batch.sa), self.critic.online.v(batch.s)
        g = batch.mc_return
        return {"val_q_loss": F.mse_loss(q1, y_q) + F.mse_loss(q2, y_q), "val_v_loss": F.mse_loss(v1, y_v) + F.mse_loss(v2, y_v),
                "val_return_mse": F.mse_loss(torch.maximum(q1, q2), g) + F.mse_loss(torch.maximum(v1, v2), g)}


def train_critic(
    data: Transitions,
    params: CriticParams | None = None,
    log_fn: LogFn | None = None,
    *,
    gamma: float | None = None,
    seed: int | None = None,
    lr: float | None = None,
    val_data: Transitions | None = None,
    show_progress: bool = False,
    checkpoint: str | Path | CriticCheckpoint | None = None,
    checkpoint_every: int = 500,
) -> tuple[DoubleCritic, list[dict[str, float]]]:
    """Train a :class:`DoubleCritic` for ``params.updates`` updates (discount ``gamma``, seed ``seed``, learning rate
    ``lr``; None: the declared defaults, the first of ``params.lrs``); returns it and the logged history.

    Every ``log_every`` updates (and at the last) one point (means over the window, plus ``step``, ``epoch`` and, with
    ``val_data``, the held-out losses ``val_q_loss``, ``val_v_loss``, their sum ``val_loss`` and ``val_return_mse``)
    is appended to the history and passed to ``log_fn(point, step)``. The weights returned are those ``params.select``
    keeps (without ``val_data`` there is no held-out error and every rule keeps the last); ``critic.config`` records
    the kept update and its held-out errors.

    With ``checkpoint`` (a file, or a :class:`CriticCheckpoint` shared by the runs of a grid), the training state is
    saved there atomically at the first logged point ``checkpoint_every`` updates after the previous save and at the
    end, and a run with the same config and data resumes from it (its past points replayed through ``log_fn``):
    killed and re-run, it ends with exactly the critic and history of an uninterrupted run.
    """
    config = critic_record(params, gamma, seed, lr)
    device = resolve_device(config.device)
    generator = seeded_generator(config.seed)  # before the weights are drawn
    critic = DoubleCritic(data.s.shape[1], data.sa.shape[1], params, gamma=config.gamma, seed=config.seed, lr=config.lr).to(device)
    trainer = CriticTrainer(critic)
    table = stack_batch(data, device, candidates=config.cql_alpha > 0)
    critic.fit_standardization(table.s, table.sa)
    val_table = stack_batch(val_data, device) if val_data is not None else None
    sampler = EpochSampler(len(data), config.batch_size, generator, device)
    window, history, best = RunningMeans(), [], BestPoint()
    saver = CriticCheckpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    fingerprint = run_fingerprint(config, table, val_table)
    done = saver.resume(fingerprint, trainer, sampler, history, best) if saver is not None else 0
    for past in history:
        if log_fn is not None:
            log_fn(past, int(past["step"]))
    saved = done
    with progress_bar(f"critic ({config.target}, lr {config.lr:g})", config.updates, enabled=show_progress) as bar:
        bar.advance(done)
        for step in range(done + 1, config.updates + 1):
            idx = sampler.next()
            window.add(trainer.update(table.rows(idx)))
            bar.advance()
            if step % config.log_every == 0 or step == config.updates:
                point = {"step": step, "epoch": step * config.batch_size / len(data), **window.pop()}
                if val_table is not None:
                    point.update(held_out_losses(trainer, val_table))
                    if config.select in CRITERION:
                        best.offer(step, point[CRITERION[config.select]], critic)
                history.append(point)
                if log_fn is not None:
                    log_fn(point, step)
                if saver is not None and (step - saved >= checkpoint_every or step == config.updates):
                    saver.save(fingerprint, step, trainer, sampler, history, best)  # the window is empty here
                    saved = step
    keep_selected(critic, best, history)
    return critic.eval(), history


CRITERION = {"best_return": "val_return_mse", "best_td": "val_loss"}  # the logged value each rule minimises


def held_out_losses(trainer: CriticTrainer, val_table: Batch) -> dict[str, float]:
    """``val_q_loss``, ``val_v_loss``, ``val_loss`` = their sum (L_val) and ``val_return_mse`` (E_ret)."""
    losses = {k: v.item() for k, v in trainer.evaluate(val_table).items()}
    return {**losses, "val_loss": losses["val_q_loss"] + losses["val_v_loss"]}


def keep_selected(critic: DoubleCritic, best: BestPoint, history: list[dict[str, float]]) -> None:
    """Load the weights ``critic.config.select`` keeps (a ``best_*`` rule: the best held-out point's, when there was
    one) and record the kept update and its held-out errors in ``critic.config``."""
    if best.state is not None:
        critic.load_state_dict(best.state)
    step = best.step if best.state is not None else int(history[-1]["step"])
    kept = next(point for point in history if int(point["step"]) == step)
    critic.config = critic.config.model_copy(update={"selected_step": step, "selected_val_loss": kept.get("val_loss"),
                                                     "selected_return_mse": kept.get("val_return_mse")})


# ----------------------------------------------------------------------------------------------- helpers


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax ignoring NaN; ties go to the lowest index (so the dataset action, index 0, wins ties)."""
    filled = scores.nan_to_num(nan=-math.inf)
    is_max = filled == filled.max(dim=-1, keepdim=True).values
    return is_max.float().argmax(dim=-1)  # argmax of a 0/1 row returns the first 1
