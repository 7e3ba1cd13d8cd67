"""DVC stage `critic`: train the double Q/V critic on the frozen features served by Feast.

    data/embeddings/<variant>/, data/features/<variant>/ ─▶ offline store ─▶ training data (critic.inputs channels)
        ─┬─ train rows ─▶ one critic per rate of critic.lrs (train_critic_grid) ─▶ the kept critic
         └─ val rows (held-out trajectories) ─▶ held-out TD loss (which update), return error (which rate), diagnostics
    outputs: models/critic/{model.safetensors, config.json, step_scores.parquet, candidate_scores.parquet,
             channel_scores.parquet (per-channel ΔQ, ΔV for the viewer, :mod:`digiq.channel_attribution`; not for VLM-only)}
             metrics/critic.json, dvclive/critic/ (Q/V loss, TD error, mean Q per logged update)
    models/critic.ckpt: the training state of every run of the grid (saved every ``critic.checkpoint_every`` updates
             and at each run's end); a killed run resumes from it; removed once the outputs are written

Decisions (documented here because the stage, not the library, makes them):

- **Truncated episodes.** The last stored step of an episode cut off by the step cap has no s' but is not terminal.
  Its TD target has no s' to bootstrap from, and treating it as terminal would teach V(s) ≈ 0 for states that are
  merely cut off: such rows are **dropped from training and validation** (both targets, so TD and MC see the same
  rows) and counted (``rows.truncated``). They are still scored, but ``step_scores.parquet`` has no row for them
  (a TD error is undefined there; the viewer shows "—").
- **Validation** holds out whole trajectories (``val_fraction`` of them, a seeded permutation of the sorted ids), so
  no state of a held-out episode leaks into training through s'. They choose the kept update (``critic.select``)
  and learning rate (:mod:`digiq.critic_grid`), and they are where the headline diagnostics are measured, per task
  too: those diagnostics are therefore measured on the data that chose among a few candidates (the grid's rates,
  the logged updates), never on the data the weights were fitted to. A ``best_*`` rule or several rates without held-out
  trajectories is an error.
- **Candidates** that do what an earlier candidate does (the candidates stage's semantic key) are masked out: a
  duplicate must not count twice in ranking or Best-of-N; each kept one carries its π_β draws (the actor's prior).
- **Reported scores**: :mod:`digiq.critic_diagnostics` (V = max(V1, V2), Q = max(Q1, Q2), advantage = Q − V).

A fixed seed gives identical weights, scores and metrics (except ``timings_s``), also when a killed run resumes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digiq.atomic import atomic_path, write_json
from digiq.errors import DigiqError

if TYPE_CHECKING:
    from digiq.config import Params

STEP_SCORES = "step_scores.parquet"
CANDIDATE_SCORES = "candidate_scores.parquet"
CURVES = ("q_loss", "v_loss", "td_error", "q_mean", "v_mean", "q_target_mean", "cql_gap", "val_q_loss", "val_v_loss", "val_loss",
          "val_return_mse")


@dataclass
class CriticOutcome:
    metrics: dict[str, Any]
    out: Path
    history: list[dict[str, float]]


def training_threads() -> int:
    """torch intra-op threads for critic training: ``$DIGIQ_THREADS``, else 1 (the heads are small MLPs: more threads
    spin-wait more than they compute, docs/benchmarks.md)."""
    from digiq.runtime import set_threads

    return set_threads(int(os.environ.get("DIGIQ_THREADS", "1")))


def checkpoint_path(out: str | Path) -> Path:
    """The training checkpoint of the critic written to ``out``: a sibling file ``<out>.ckpt``."""
    out = Path(out)
    return out.with_name(f"{out.name}.ckpt")


def open_live(directory: str) -> Any:
    from dvclive import Live

    return Live(directory, save_dvc_exp=False, dvcyaml=False, report=None)


def run(params: Params, *, progress: bool = False) -> CriticOutcome:
    """Train the critic on the store's transitions and write weights, scores, metrics and curves."""
    import pyarrow.parquet as pq
    import torch

    from digiq.channel_attribution import FILE as CHANNEL_SCORES, attribution_table
    from digiq.critic_diagnostics import (candidate_scores, critic_diagnostics, critic_metrics, per_task_diagnostics, step_scores,
                                          trajectory_task)
    from digiq.critic_grid import train_critic_grid
    from digiq.stage_outputs import live_curves
    from digiq.training_data import read_training_data, split_trajectories

    p, out = params.critic, Path(params.critic.out)
    started = time.perf_counter()
    threads = training_threads()
    data = read_training_data(params.features, channels=None if p.inputs.vlm_only else params.channels.out)
    loaded = time.perf_counter()
    is_val = split_trajectories(data.traj_id, p.val_fraction, params.seed)
    train_rows, val_rows = np.flatnonzero(~is_val & ~data.truncated), np.flatnonzero(is_val & ~data.truncated)
    if len(train_rows) == 0:
        raise DigiqError("no training transitions left after holding out validation trajectories and truncated steps",
                         file=data.source, field="critic.val_fraction")
    if p.select != "last" and len(val_rows) == 0:
        raise DigiqError(f"{p.select} needs held-out trajectories: set critic.val_fraction > 0 or critic.select=last",
                         file=data.source, field="critic.select")
    train_data = data.transitions(train_rows, inputs=p.inputs)
    val_data = data.transitions(val_rows, inputs=p.inputs) if len(val_rows) else None
    with live_curves(p.live_dir, CURVES, open_live) as log_fn:
        train_start = time.perf_counter()  # training time excludes DVCLive's start-up
        critic, history, grid = train_critic_grid(train_data, p, gamma=params.gamma, seed=params.seed, val_data=val_data, log_fn=log_fn,
                                                  show_progress=progress, checkpoint=checkpoint_path(out), checkpoint_every=p.checkpoint_every)
        trained = time.perf_counter()
    with torch.no_grad():
        diagnostics = {"train": critic_diagnostics(critic, train_data)}
        if val_data is not None:
            diagnostics["val"] = critic_diagnostics(critic, val_data)
        on_rows, on_data = (val_rows, val_data) if val_data is not None else (train_rows, train_data)
        diagnostics["per_task"] = per_task_diagnostics(critic, on_data, trajectory_task(data.traj_id[on_rows]))
    split = np.where(data.truncated, "truncated", np.where(is_val, "val", "train"))
    with atomic_path(out) as tmp:
        critic.save_pretrained(tmp)
        pq.write_table(step_scores(critic, data, np.flatnonzero(~data.truncated), split), tmp / STEP_SCORES)
        pq.write_table(candidate_scores(critic, data), tmp / CANDIDATE_SCORES)
        if not p.inputs.vlm_only:
            pq.write_table(attribution_table(critic, data, np.arange(len(data)), mean_rows=train_rows), tmp / CHANNEL_SCORES)
    timings = {"load": loaded - started, "train": trained - train_start, "total": time.perf_counter() - started,
               "updates_per_s": p.updates * len(p.lrs) / max(trained - train_start, 1e-9),
               **{f"frame_{k.removesuffix('_s')}": v for k, v in data.frame.timings.items()}, "threads": threads}
    metrics = critic_metrics(critic, params.features.variant, data, is_val, history, diagnostics, timings, grid)
    write_json(p.metrics, metrics)
    checkpoint_path(out).unlink(missing_ok=True)
    return CriticOutcome(metrics=metrics, out=out, history=history)
