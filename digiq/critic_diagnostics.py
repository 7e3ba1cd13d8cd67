"""What the critic stage reports besides its weights: diagnostics, per-step and per-candidate scores, its metrics.

    diagnostics = critic_diagnostics(critic, transitions)    # V calibration, action sensitivity, ranking, π_β agreement
    step_scores(critic, data, rows, split)                   # the viewer's step table: V, Q, advantage, TD error
    candidate_scores(critic, data)                           # the viewer's candidate table: Q of every candidate

Scores use the critic's policy-extraction convention: V = max(V1, V2), Q = max(Q1, Q2), advantage = Q − V;
``td_error`` = (the Q target the critic was trained on) − Q.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from digiq.critic import DoubleCritic, device_of, first_argmax, td_q_target
from digiq.nn import map_chunks
from digiq.stage_outputs import finite_or_none
from digiq.transitions import Batch, Transitions

if TYPE_CHECKING:
    import pyarrow as pa

    from digiq.training_data import TrainingData


# ----------------------------------------------------------------------------------------------- diagnostics


def candidate_q(critic: DoubleCritic, data: Transitions) -> torch.Tensor:
    """max(Q1, Q2) of every candidate [B, K] (invalid candidates: NaN)."""
    data.require("cand_sa", "cand_mask")
    q = map_chunks(critic.q_value, data.cand_sa, device=device_of(critic))
    return q.masked_fill(~data.cand_mask.cpu(), math.nan)


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
    v = map_chunks(critic.v_value, data.s, device=device_of(critic))
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


# ----------------------------------------------------------------------------------------------- scores (the viewer's contract)


def q_targets(critic: DoubleCritic, data: Transitions) -> torch.Tensor:
    """The Q target the critic was trained on, per row: r + γ(1 − done)·min V̄(s') (td) or G(s) (mc)."""
    config = critic.config
    if config.target == "mc":
        return data.mc_return.float().cpu()
    return map_chunks(lambda *cols: td_q_target(critic.target, Batch(*cols), config.gamma),
                      data.s, data.sa, data.s_next, data.reward, data.done, data.mc_return, device=device_of(critic))


def step_scores(critic: DoubleCritic, data: TrainingData, rows: np.ndarray, split: np.ndarray) -> pa.Table:
    """traj_id, step_id, v, q, advantage, td_error and split of ``rows``."""
    import pyarrow as pa

    transitions = data.transitions(rows)
    v = map_chunks(critic.v_value, transitions.s, device=device_of(critic))
    q = map_chunks(critic.q_value, transitions.sa, device=device_of(critic))
    return pa.table({
        "traj_id": pa.array(data.traj_id[rows].tolist(), pa.string()), "step_id": pa.array(data.step_id[rows], pa.int64()),
        "v": v.double().numpy(), "q": q.double().numpy(), "advantage": (q - v).double().numpy(),
        "td_error": (q_targets(critic, transitions) - q).double().numpy(), "split": pa.array(split[rows].tolist(), pa.string()),
    })


def candidate_scores(critic: DoubleCritic, data: TrainingData) -> pa.Table:
    """traj_id, step_id, cand_idx, action and q of every candidate the store serves."""
    import pyarrow as pa

    f = data.frame
    q = map_chunks(critic.q_value, torch.from_numpy(f.candidates), device=device_of(critic)).double().numpy()
    row, idx = np.nonzero(f.candidate_mask)
    return pa.table({
        "traj_id": pa.array(data.traj_id[row].tolist(), pa.string()), "step_id": pa.array(data.step_id[row], pa.int64()),
        "cand_idx": pa.array(idx, pa.int64()), "action": pa.array(f.candidate_actions[row, idx].tolist(), pa.string()),
        "q": q[row, idx],
    })


# ----------------------------------------------------------------------------------------------- the stage's metrics


def critic_metrics(critic: DoubleCritic, variant: str, data: TrainingData, is_val: np.ndarray,
                   history: list[dict[str, float]], diagnostics: dict[str, dict[str, float]],
                   timings: dict[str, float]) -> dict[str, Any]:
    """metrics/critic.json: headline diagnostics (held-out when there is a validation split), losses, counts."""
    last = history[-1]
    headline = diagnostics.get("val", diagnostics["train"])
    metrics = {
        "variant": variant,
        "target": critic.config.target,
        "updates": critic.config.updates,
        "rows": {"total": len(data), "train": int((~is_val & ~data.truncated).sum()), "val": int((is_val & ~data.truncated).sum()),
                 "truncated": int(data.truncated.sum()), "terminal": int(data.frame.done.sum())},
        "trajectories": {"total": len(np.unique(data.traj_id)), "val": len(np.unique(data.traj_id[is_val])),
                         "success_rate_of_rows": float(data.success.mean())},
        "candidates": {"k_max": int(data.frame.candidate_mask.shape[1]), "distinct_per_state": float(data.distinct.sum(1).mean())},
        "action_sensitivity": headline.get("action_sensitivity"),
        "ranking_quality": headline.get("ranking_quality"),
        "v_return_corr": headline.get("v_return_corr"),
        "diagnostics_on": "val" if "val" in diagnostics else "train",
        "train": {name: last[name] for name in ("q_loss", "v_loss", "td_error", "q_mean", "v_mean", "cql_gap") if name in last},
        "val": {name.removeprefix("val_"): last[name] for name in ("val_q_loss", "val_v_loss") if name in last},
        "diagnostics": diagnostics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return finite_or_none(metrics)

