"""DigiRL offline (arXiv 2406.11896) on frozen features: its two values, its advantage, and the filter that picks
which dataset actions the actor imitates.

As the official code defines them (DigiRL-agent/digirl: ``digirl/algorithms/digirl/trainer.py``,
``digirl/algorithms/offpolicy_train_loop.py``, ``digirl/models/critic.py``, ``digirl/environment/env_utils.py``).
Inputs here: x_V(s) = ``transitions.s`` (the V inputs: image, goal, previous action when the channels are on),
c = the instruction with its initial state, stood for by x_V of the trajectory's first step (its goal channel
carries the instruction; the official trajectory critic reads the first observation's text, which holds the goal).

    G_h = Σ_{t ≥ h} γ^{t−h} r_t        (add_mc_return, per trajectory, steps ordered by step_id)
    r(τ) = Σ_t r_t                     (add_trajectory_reward)

    Instruction-level value  V_traj(c) = softmax(MLP_traj(z(x_V(s_0))))[1]  ∈ [1e-4, 1 − 1e-4] (clamped as
        label_trajectories does), trained by cross-entropy on the target y_τ = 1[G_H > 0] (the last step's return).
    Step-level value  V_i(s) = softmax(MLP_i(z(x_V(s))))[1], i ∈ {1, 2};  V(s) = min(V_1(s), V_2(s)),
        trained by cross-entropy on y_h = 1[G_h > 0], at s_h and at s_{h+1} with the same target (the official
        critic_loss):  L = Σ_i CE(V_i(s_h), y_h) + CE(V_i(s_{h+1}), y_h).
    Step advantage  A(s_h, a_h) = V(s_{h+1}) − V(s_h) − δ + r_h + G_h        (δ = ``step_offset``, official 0.05)
        where the store serves no s_{h+1} (terminal and cut-off steps), V(s_{h+1}) = 0 and no s' term is trained.
    Trajectory filter  score(τ) = r(τ)                ("reward": filterbc_buffer, what the official offline
                                                        training uses: "offline training will never use the
                                                        trajectory-level critic filter")
                       score(τ) = r(τ) − V_traj(c_τ)   ("value": filter_buffer, the online/off-to-on filter)
        τ is kept when score(τ) ≥ quantile_{1−p}(scores)  (p = ``top_fraction``, official 0.1; linear interpolation
        as numpy's quantile), the quantile taken over the values' training trajectories and over the held-out ones
        apart (the official code filters its train and validation buffers apart).
    Imitation weight (actor_loss):  W[h, 0] = 1[τ(h) kept] · 1[clamp(A(s_h, a_h), 0, 1) > 0],  W[h, k>0] = 0.
        DigiRL imitates its own data's actions: only column 0, the dataset action, ever carries weight; the actor
        then minimises −mean_h W[h, 0] · log π(a_h | s_h) (:func:`digiq.actor.imitation_loss`).

The paper's step advantage is a doubly-robust mix of the final reward and the one-step value difference; the official
actor_loss adds the discounted return to the difference instead (above), and that is what is implemented.

Deviations (the official values read RoBERTa text features + 2 × 1408-d image features; here the project's frozen
features): the instruction critic is a head on frozen features (the official one fine-tunes
RoBERTa under a linear head); inputs are standardised when ``standardize`` (as the Digi-Q critic here); both values
are trained on the trajectories outside a held-out share (``val_fraction``, official 80/20 split) and then applied
to every trajectory: the official actor imitates the filtered training trajectories only, the actor stage here
trains on every state, so W also holds the filtered held-out trajectories' rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from digiq.errors import DigiqError

if TYPE_CHECKING:
    import torch

    from digiq.critic import Transitions
    from digiq.training_data import TrainingData


class DigirlParams(BaseModel):
    """DigiRL offline's settings (a Section like config's: declared here so that config can embed it without a cycle)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    trajectory_filter: Literal["reward", "value"] = Field(
        "reward", description="trajectories imitated: reward = top r(τ) (official offline), value = top r(τ) − V_traj(c) (official online)")
    top_fraction: float = Field(0.1, gt=0.0, le=1.0, description="keep trajectories whose score is ≥ the (1 − this) quantile (official 0.1)")
    step_offset: float = Field(0.05, description="δ in A = V(s') − V(s) − δ + r + G (official 0.05)")
    step_hidden: list[int] = Field(default_factory=lambda: [768, 768], description="hidden widths of each step-level value MLP (official in_dim, in_dim = 768)")
    instruction_hidden: list[int] = Field(default_factory=list, description="hidden widths of the instruction-level value head (official: one linear layer)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of both values (official critic_lr 1e-4)")
    grad_clip: float = Field(0.01, gt=0, description="max grad norm per value (official max_grad_norm 0.01)")
    step_updates: int = Field(100, ge=1, description="step-level value updates (official 20 iterations × 5 epochs)")
    instruction_updates: int = Field(100, ge=1, description="instruction-level value updates (official 20 iterations × 5 epochs)")
    step_batch_size: int = Field(128, ge=1, description="transitions per step-level update (official 4 × 32 accumulated)")
    instruction_batch_size: int = Field(256, ge=1, description="trajectories per instruction-level update, with replacement (official 8 × 32)")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of trajectories held out from both values' training (official 0.2)")
    standardize: bool = Field(True, description="standardise the values' inputs (training mean/std, as the Digi-Q critic here); false: raw, as official")
    device: str = Field("auto", description="auto (cuda when visible) | cpu | cuda | cuda:N")


class Trajectories(NamedTuple):
    """Rows grouped by trajectory: ``code`` [N] trajectory index per row, ``first`` / ``last`` [T] row of each
    trajectory's first and last step (by step_id), ``order`` [N] rows sorted by (trajectory, step)."""

    code: np.ndarray
    first: np.ndarray
    last: np.ndarray
    order: np.ndarray


def group_trajectories(traj_id: np.ndarray, step_id: np.ndarray, source: str | None = None) -> Trajectories:
    """Group rows by trajectory and order each by step (DigiqError on a repeated (trajectory, step))."""
    _, code = np.unique(traj_id, return_inverse=True)
    code = code.reshape(-1)
    order = np.lexsort((step_id, code))
    same = (code[order][1:] == code[order][:-1])
    if bool((same & (step_id[order][1:] == step_id[order][:-1])).any()):
        raise DigiqError("a (trajectory, step) pair occurs twice", file=source, field="step_id")
    starts = np.flatnonzero(np.r_[True, ~same])
    ends = np.r_[starts[1:] - 1, len(order) - 1]
    return Trajectories(code=code, first=order[starts], last=order[ends], order=order)


def discounted_returns(reward: np.ndarray, trajs: Trajectories, gamma: float) -> np.ndarray:
    """G_h = r_h + γ G_{h+1} within each trajectory (0 past its last step) [N] float64."""
    g = np.zeros(len(reward), dtype=np.float64)
    order, code = trajs.order, trajs.code
    for pos in range(len(order) - 1, -1, -1):
        row = order[pos]
        later = g[order[pos + 1]] if pos + 1 < len(order) and code[order[pos + 1]] == code[row] else 0.0
        g[row] = reward[row] + gamma * later
    return g


def step_advantage(v: torch.Tensor, v_next: torch.Tensor, reward: torch.Tensor, mc_return: torch.Tensor,
                   offset: float) -> torch.Tensor:
    """A = V(s') − V(s) − δ + r + G (official actor_loss)."""
    return v_next - v - offset + reward + mc_return


def trajectory_kept(score: np.ndarray, top_fraction: float) -> tuple[np.ndarray, float]:
    """Trajectories with score ≥ the (1 − top_fraction) quantile [T] bool, and that cutoff."""
    cutoff = float(np.quantile(score, 1.0 - top_fraction))
    return score >= cutoff, cutoff


def imitated(adv: torch.Tensor, kept_row: torch.Tensor) -> torch.Tensor:
    """[N] bool: the row's trajectory is kept and clamp(A, 0, 1) > 0 (i.e. A > 0)."""
    return kept_row & (adv.clamp(0.0, 1.0) > 0)


def success_prob(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(head(x))[:, 1]: the value as the official critics read it (probability of the class 'G > 0')."""
    import torch

    return torch.softmax(head(x), dim=-1)[:, 1]


# ----------------------------------------------------------------------------------------------- the two values


def _fit(heads: list[torch.nn.Module], loss_fn: Callable[[torch.Tensor], torch.Tensor], n_rows: int, batch_size: int, updates: int, params: DigirlParams,
         generator: torch.Generator, device: str) -> None:
    """``updates`` Adam steps on ``loss_fn(rows)``, rows drawn uniformly with replacement (the official buffers'
    sample), gradients clipped jointly over ``heads``."""
    import torch

    parameters = [p for head in heads for p in head.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=params.lr)
    for _ in range(updates):
        rows = torch.randint(n_rows, (batch_size,), generator=generator).to(device)
        loss = loss_fn(rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, params.grad_clip)
        optimizer.step()


def _new_head(in_dim: int, hidden: list[int], standardize: bool, fit_on: torch.Tensor, device: str) -> torch.nn.Module:
    from digiq.nn import mlp

    head = mlp(in_dim, hidden, 2, standardize=standardize)
    if standardize:
        head[0].fit(fit_on)
    return head.to(device)


def step_value_loss(heads: list[torch.nn.Module], s: torch.Tensor, s_next: torch.Tensor, has_next: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """Σ_i CE(V_i(s), y) + CE(V_i(s'), y), the s' term over rows with an s' only."""
    import torch.nn.functional as F

    total = s.new_zeros(())
    for head in heads:
        total = total + F.cross_entropy(head(s), y)
        if bool(has_next.any()):
            total = total + F.cross_entropy(head(s_next[has_next]), y[has_next])
    return total


def train_step_value(s: torch.Tensor, s_next: torch.Tensor, has_next: torch.Tensor, y: torch.Tensor, train: torch.Tensor,
                     params: DigirlParams, generator: torch.Generator, device: str) -> tuple[list[torch.nn.Module], dict[str, float]]:
    """The two step-level heads trained on the ``train`` rows; their train / held-out loss and held-out accuracy."""
    import torch

    heads = [_new_head(s.shape[1], params.step_hidden, params.standardize, s[train], device) for _ in range(2)]
    tr = [t[train].to(device) for t in (s, s_next, has_next, y)]
    _fit(heads, lambda rows: step_value_loss(heads, *(t[rows] for t in tr)), len(tr[0]), params.step_batch_size,
         params.step_updates, params, generator, device)
    with torch.no_grad():
        metrics = {"step_value_loss": step_value_loss(heads, *tr).item()}
        val = ~train
        if bool(val.any()):
            va = [t[val].to(device) for t in (s, s_next, has_next, y)]
            metrics["step_value_val_loss"] = step_value_loss(heads, *va).item()
            metrics["step_value_val_acc"] = _accuracy(heads, va[0], va[3])
        else:
            metrics["step_value_val_loss"] = metrics["step_value_val_acc"] = math.nan
    return heads, metrics


def train_instruction_value(x0: torch.Tensor, y: torch.Tensor, train: torch.Tensor, params: DigirlParams,
                            generator: torch.Generator, device: str) -> tuple[torch.nn.Module, dict[str, float]]:
    """The instruction-level head trained on the ``train`` trajectories (one row each: its first state)."""
    import torch
    import torch.nn.functional as F

    head = _new_head(x0.shape[1], params.instruction_hidden, params.standardize, x0[train], device)
    xt, yt = x0[train].to(device), y[train].to(device)
    _fit([head], lambda rows: F.cross_entropy(head(xt[rows]), yt[rows]), len(xt), params.instruction_batch_size,
         params.instruction_updates, params, generator, device)
    with torch.no_grad():
        metrics = {"instruction_value_loss": F.cross_entropy(head(xt), yt).item()}
        val = ~train
        if bool(val.any()):
            xv, yv = x0[val].to(device), y[val].to(device)
            metrics["instruction_value_val_loss"] = F.cross_entropy(head(xv), yv).item()
            metrics["instruction_value_val_acc"] = _accuracy([head], xv, yv)
        else:
            metrics["instruction_value_val_loss"] = metrics["instruction_value_val_acc"] = math.nan
    return head, metrics


def _accuracy(heads: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the heads of the share of rows whose argmax class is the target."""
    return sum((head(x).argmax(dim=1) == y).float().mean().item() for head in heads) / len(heads)


# ----------------------------------------------------------------------------------------------- the weights


def _check_inputs(data: TrainingData, transitions: Transitions) -> None:
    n = len(data.traj_id)
    for name in ("step_id", "truncated"):
        if len(getattr(data, name)) != n:
            raise DigiqError(f"expected {n} rows (one per traj_id), got {len(getattr(data, name))}", file=data.source, field=name)
    if len(transitions) != n:
        raise DigiqError(f"expected the training data's {n} rows, got {len(transitions)} transitions", file=transitions.source,
                         field="transitions")
    transitions.require("cand_mask")
    if n == 0:
        raise DigiqError("no transitions", file=data.source, field="transitions")


def digirl_weights(data: TrainingData, transitions: Transitions, params: DigirlParams, gamma: float,
                   seed: int) -> tuple[torch.Tensor, dict[str, float]]:
    """DigiRL's imitation weights W [B, K] (only column 0, the dataset action: DigiRL imitates its own data) and
    metrics (values' losses, kept shares, mean advantage). Same seed → identical W and metrics."""
    import torch

    from digiq.nn import map_chunks, resolve_device, seeded_generator
    from digiq.training_data import split_trajectories

    _check_inputs(data, transitions)
    trajs = group_trajectories(np.asarray(data.traj_id), np.asarray(data.step_id), data.source)
    reward = transitions.reward.double().cpu().numpy()
    g = discounted_returns(reward, trajs, gamma)
    success = g[trajs.last] > 0  # y_τ = 1[G_H > 0]
    if not bool(success.any()):
        raise DigiqError("no trajectory succeeded (no last step with return > 0): DigiRL's values have nothing to learn",
                         file=data.source, field="reward")
    device = resolve_device(params.device)
    generator = seeded_generator(seed)
    held_out = split_trajectories(np.asarray(data.traj_id), params.val_fraction, seed)
    s, s_next = transitions.s.float().cpu(), transitions.s_next.float().cpu()
    has_next = ~(transitions.done.cpu().bool() | torch.from_numpy(np.asarray(data.truncated, dtype=bool)))
    y_step = torch.from_numpy(g > 0).long()
    heads, metrics = train_step_value(s, s_next, has_next, y_step, torch.from_numpy(~held_out), params, generator, device)
    x0 = s[torch.from_numpy(trajs.first)]
    held_traj = held_out[trajs.first]
    traj_head, traj_metrics = train_instruction_value(x0, torch.from_numpy(success).long(), torch.from_numpy(~held_traj),
                                                      params, generator, device)
    metrics.update(traj_metrics)

    def value(x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(success_prob(heads[0], x), success_prob(heads[1], x))

    v = map_chunks(value, s, device=device)
    v_next = torch.where(has_next, map_chunks(value, s_next, device=device), torch.zeros(()))
    adv = step_advantage(v.double(), v_next.double(), transitions.reward.double().cpu(), torch.from_numpy(g), params.step_offset)
    v_traj = map_chunks(lambda x: success_prob(traj_head, x), x0, device=device).clamp(1e-4, 1 - 1e-4).double().numpy()
    traj_reward = np.bincount(trajs.code, weights=reward, minlength=len(trajs.first))
    score = traj_reward - v_traj if params.trajectory_filter == "value" else traj_reward
    kept_traj, cutoffs = np.zeros(len(score), dtype=bool), []
    for part in (~held_traj, held_traj):  # the official code filters its train and validation buffers apart
        if part.any():
            kept_traj[part], cutoff = trajectory_kept(score[part], params.top_fraction)
            cutoffs.append(cutoff)
    kept = imitated(adv, torch.from_numpy(kept_traj[trajs.code]))
    weights = torch.zeros(transitions.cand_mask.shape, dtype=torch.float32)
    weights[:, 0] = kept.float()
    metrics.update({
        "n_states": len(kept), "n_kept": int(kept.sum()), "frac_states_kept": kept.float().mean().item(),
        "frac_trajectories_kept": float(kept_traj.mean()), "trajectory_cutoff": cutoffs[0],
        "trajectory_cutoff_val": cutoffs[1] if len(cutoffs) > 1 else math.nan,
        "mean_step_advantage": adv.mean().item(),
        "mean_step_advantage_kept": adv[kept].mean().item() if bool(kept.any()) else math.nan,
        "mean_instruction_value": float(v_traj.mean()), "instruction_success_rate": float(success.mean()),
    })
    return weights, metrics
