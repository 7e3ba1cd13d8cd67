"""What the critic stage reports besides its weights: diagnostics, per-step and per-candidate scores, its metrics.

    diagnostics = critic_diagnostics(critic, transitions)    # V calibration, return error, action sensitivity, ranking, π_β agreement
    per_task_diagnostics(critic, transitions, tasks)         # ranking and π_β agreement per task
    step_scores(critic, data, rows, split)                   # the viewer's step table: V, Q, advantage, TD error
    candidate_scores(critic, data)                           # the viewer's candidate table: Q of every candidate

Scores use the critic's policy-extraction convention: V = max(V1, V2), Q = max(Q1, Q2), advantage = Q − V;
``td_error`` = (the Q target the critic was trained on) − Q.
"""

from __future__ import annotations

import math
import re
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


def return_error(critic: DoubleCritic, data: Transitions) -> dict[str, float]:
    """How far the critic's values are from the observed discounted returns G (the learning-rate grid's criterion,
    :mod:`digiq.critic_grid`): ``q_return_mse`` = mean (max(Q1, Q2)(s, a_data) − G)², ``v_return_mse`` = mean
    (max(V1, V2)(s) − G)², ``return_mse`` their sum."""
    g = data.mc_return.float().cpu()
    q = map_chunks(critic.q_value, data.sa, device=device_of(critic))
    v = map_chunks(critic.v_value, data.s, device=device_of(critic))
    q_mse, v_mse = ((q - g) ** 2).mean().item(), ((v - g) ** 2).mean().item()
    return {"q_return_mse": q_mse, "v_return_mse": v_mse, "return_mse": q_mse + v_mse}


def critic_diagnostics(critic: DoubleCritic, data: Transitions) -> dict[str, float]:
    """All diagnostics that ``data`` allows (candidate-based ones need ``cand_sa``; ranking needs success)."""
    out = v_calibration(critic, data) | return_error(critic, data)
    if data.cand_sa is not None:
        q = candidate_q(critic, data)
        out |= action_sensitivity(critic, data, q) | behavior_agreement(critic, data, q)
        if data.traj_success is not None:
            out |= ranking_quality(critic, data, q)
    return out


def per_task_diagnostics(critic: DoubleCritic, data: Transitions, tasks: np.ndarray) -> dict[str, dict[str, float]]:
    """Per task (``tasks``: [B] names aligned with ``data``'s rows): held-out ranking and how often the critic's
    favourite is π_β's most-drawn candidate (what critic-greedy evaluation would change), with the states counted."""
    data.require("cand_sa", "cand_mask", "cand_count", "traj_success")
    q = candidate_q(critic, data)
    out = {}
    for task in sorted(set(tasks.tolist())):
        rows = torch.from_numpy(np.asarray(tasks == task))
        subset, q_task = data.subset(rows), q[rows]
        out[task] = {"states": int(rows.sum())} | ranking_quality(critic, subset, q_task)
        if bool((subset.cand_mask.sum(dim=1) >= 2).any()):
            out[task] |= behavior_agreement(critic, subset, q_task)
    return out


def trajectory_task(traj_id: np.ndarray) -> np.ndarray:
    """The task of each trajectory id ``<task>.s<seed>.e<episode>`` (:func:`digiq.envs.rollout.trajectory_id`);
    "unknown" for ids of another form (imported datasets)."""
    return np.array([m.group(1) if (m := _TRAJ_ID.match(str(t))) else "unknown" for t in traj_id], dtype=object)


_TRAJ_ID = re.compile(r"^(.+)\.s\d+\.e\d+$")


# ----------------------------------------------------------------------------------------------- scores (the viewer's contract)

CHUNK = 512  # rows composed at a time: x_Q of every candidate of every row at once would hold K copies of the inputs


def q_targets(critic: DoubleCritic, data: Transitions) -> torch.Tensor:
    """The Q target the critic was trained on, per row: r + γ(1 − done)·min V̄(s') (td) or G(s) (mc)."""
    config = critic.config
    if config.target == "mc":
        return data.mc_return.float().cpu()
    return map_chunks(lambda *cols: td_q_target(critic.target, Batch(*cols), config.gamma),
                      data.s, data.sa, data.s_next, data.reward, data.done, data.mc_return, device=device_of(critic))


def step_scores(critic: DoubleCritic, data: TrainingData, rows: np.ndarray, split: np.ndarray) -> pa.Table:
    """traj_id, step_id, v, q, advantage, td_error and split of ``rows`` (on the critic's inputs, ``CHUNK`` rows at a time)."""
    import pyarrow as pa

    parts = []
    for chunk in np.array_split(rows, max(1, -(-len(rows) // CHUNK))):
        transitions = data.transitions(chunk, inputs=critic.config.inputs)
        v = map_chunks(critic.v_value, transitions.s, device=device_of(critic))
        q = map_chunks(critic.q_value, transitions.sa, device=device_of(critic))
        parts.append((v, q, q_targets(critic, transitions) - q))
    v, q, td_error = (torch.cat(column).double().numpy() for column in zip(*parts))
    return pa.table({
        "traj_id": pa.array(data.traj_id[rows].tolist(), pa.string()), "step_id": pa.array(data.step_id[rows], pa.int64()),
        "v": v, "q": q, "advantage": q - v, "td_error": td_error, "split": pa.array(split[rows].tolist(), pa.string()),
    })


def candidate_scores(critic: DoubleCritic, data: TrainingData) -> pa.Table:
    """traj_id, step_id, cand_idx, action and q of every candidate the store serves (Q on the critic's inputs x_Q)."""
    import pyarrow as pa

    f = data.frame
    q = np.concatenate([map_chunks(critic.q_value, data.transitions(chunk, inputs=critic.config.inputs).cand_sa, device=device_of(critic)).double().numpy()
                        for chunk in np.array_split(np.arange(len(data)), max(1, -(-len(data) // CHUNK)))])
    row, idx = np.nonzero(f.candidate_mask)
    return pa.table({
        "traj_id": pa.array(data.traj_id[row].tolist(), pa.string()), "step_id": pa.array(data.step_id[row], pa.int64()),
        "cand_idx": pa.array(idx, pa.int64()), "action": pa.array(f.candidate_actions[row, idx].tolist(), pa.string()),
        "q": q[row, idx],
    })


# ----------------------------------------------------------------------------------------------- the stage's metrics


def critic_metrics(critic: DoubleCritic, variant: str, data: TrainingData, is_val: np.ndarray,
                   history: list[dict[str, float]], diagnostics: dict[str, Any], timings: dict[str, float],
                   grid: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics/critic.json: headline diagnostics (held-out when there is a validation split), the kept update and
    learning rate (``selection``, ``lr_grid``), losses at the kept update, counts."""
    config = critic.config
    kept = next(point for point in history if int(point["step"]) == config.selected_step)
    headline = diagnostics.get("val", diagnostics["train"])
    metrics = {
        "variant": variant,
        "target": config.target,
        "inputs": config.inputs.model_dump(),
        "updates": config.updates,
        "selection": {"select": config.select, "step": config.selected_step, "lr": config.lr,
                      "val_loss": config.selected_val_loss, "return_mse": config.selected_return_mse,
                      "lr_criterion": "return_mse: held-out mean (Q(s, a) − G)² + mean (V(s) − G)² at each rate's kept step"},
        "lr_grid": grid,
        "rows": {"total": len(data), "train": int((~is_val & ~data.truncated).sum()), "val": int((is_val & ~data.truncated).sum()),
                 "truncated": int(data.truncated.sum()), "terminal": int(data.frame.done.sum())},
        "trajectories": {"total": len(np.unique(data.traj_id)), "val": len(np.unique(data.traj_id[is_val])),
                         "success_rate_of_rows": float(data.success.mean())},
        "candidates": {"k_max": int(data.frame.candidate_mask.shape[1]), "distinct_per_state": float(data.distinct.sum(1).mean())},
        "action_sensitivity": headline.get("action_sensitivity"),
        "ranking_quality": headline.get("ranking_quality"),
        "argmax_is_behavior_mode_frac": headline.get("argmax_is_behavior_mode_frac"),
        "v_return_corr": headline.get("v_return_corr"),
        "return_mse": headline.get("return_mse"),
        "diagnostics_on": "val" if "val" in diagnostics else "train",
        "train": {name: kept[name] for name in ("q_loss", "v_loss", "td_error", "q_mean", "v_mean", "cql_gap") if name in kept},
        "val": {name.removeprefix("val_"): kept[name] for name in ("val_q_loss", "val_v_loss") if name in kept},
        "diagnostics": diagnostics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return finite_or_none(metrics)
