"""The critic's learning rate, chosen on held-out trajectories: one critic per rate of ``critic.lrs``, one kept.

Each rate trains a critic with :func:`digiq.critic.train_critic` (same seed: same initial weights and batches; its
weights are those ``critic.select`` keeps, by default the update with the lowest held-out return error). The runs are
then compared on the held-out rows by how far their values, at the kept update, are from the observed discounted
returns G:

    E_ret = mean_b (Q(s_b, a_b) − G_b)² + mean_b (V(s_b) − G_b)²        Q = max(Q1, Q2), V = max(V1, V2) (what A reads)

and the rate with the lowest E_ret is kept (ties: the earlier in ``critic.lrs``).

Why this criterion:

- It is comparable across runs. For any function Q, E[(Q(s, a) − G)²] = E[(Q(s, a) − Q^β(s, a))²] + E[Var(G | s, a)]:
  the second term is the same for every critic on the same rows, so E_ret ranks critics by their squared distance from
  π_β's values Q^β(s, a) = E[G | s, a] and V^β(s) = E[G | s], which is what TD on the dataset actions estimates
  (y_V is Q̄ at a_data). The held-out TD loss is not: each run measures it against its own target heads, and heads
  that merely agree with themselves score low whatever they predict.
- It is not the reported diagnostic. Held-out ranking (the dataset action of a successful trajectory against the
  state's other candidates) is what the critic is judged by; choosing the rate on it would bias that figure upward.
  It is recorded for every rate, beside E_ret, but does not choose.

Caveat: G of a step in an episode cut off by the step cap misses the rewards after the cut (those episodes'
last rows are dropped, the earlier ones are not); every critic is measured against the same G.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from digiq.config import CriticParams
from digiq.critic import DoubleCritic, LogFn, train_critic
from digiq.critic_checkpoint import CriticCheckpoint
from digiq.critic_diagnostics import ranking_quality
from digiq.errors import DigiqError
from digiq.transitions import Transitions


def train_critic_grid(
    data: Transitions,
    params: CriticParams,
    *,
    gamma: float | None = None,
    seed: int | None = None,
    val_data: Transitions | None = None,
    log_fn: LogFn | None = None,
    show_progress: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 500,
) -> tuple[DoubleCritic, list[dict[str, float]], list[dict[str, Any]]]:
    """Train one critic per rate of ``params.lrs`` and keep the one with the lowest held-out E_ret; returns it, its
    history (replayed through ``log_fn`` once the grid is done) and one row per rate: ``lr``, ``selected_step``,
    ``selected_val_loss``, ``return_mse`` (E_ret), ``ranking_quality`` (held-out) and ``chosen``.

    ``checkpoint``: one file for all the runs (:class:`CriticCheckpoint`); a grid killed and re-run resumes its
    current run and does not train its finished ones again. Several rates need ``val_data`` (DigiqError otherwise).
    """
    if len(params.lrs) > 1 and val_data is None:
        raise DigiqError(f"choosing among {len(params.lrs)} learning rates needs held-out trajectories (val_fraction > 0)",
                         field="critic.lrs")
    saver = CriticCheckpoint(checkpoint) if checkpoint is not None else None
    best: tuple[float, DoubleCritic, list[dict[str, float]], int] | None = None
    rows: list[dict[str, Any]] = []
    for i, lr in enumerate(params.lrs):
        critic, history = train_critic(data, params, gamma=gamma, seed=seed, lr=lr, val_data=val_data, show_progress=show_progress,
                                       checkpoint=saver, checkpoint_every=checkpoint_every)
        row = grid_row(critic, val_data)
        rows.append(row)
        score = row["return_mse"] if row["return_mse"] is not None else 0.0  # one rate and no held-out data
        if best is None or score < best[0]:
            best = (score, critic, history, i)
    _, critic, history, chosen = best
    for i, row in enumerate(rows):
        row["chosen"] = i == chosen
    if log_fn is not None:
        for point in history:
            log_fn(point, int(point["step"]))
    return critic, history, rows


def grid_row(critic: DoubleCritic, val_data: Transitions | None) -> dict[str, Any]:
    """One rate's results: its kept update, the held-out TD loss and E_ret there, and its held-out ranking (None
    without held-out data)."""
    config = critic.config
    row: dict[str, Any] = {"lr": config.lr, "selected_step": config.selected_step, "selected_val_loss": config.selected_val_loss,
                           "return_mse": config.selected_return_mse, "ranking_quality": None}
    if val_data is not None and val_data.cand_sa is not None and val_data.traj_success is not None:
        row["ranking_quality"] = ranking_quality(critic, val_data)["ranking_quality"]
    return row
