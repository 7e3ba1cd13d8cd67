"""DVC stage `actor` (foreach over params.actor.methods): extract a policy from the frozen features + the critic.

    data/embeddings/<variant>/, data/features/<variant>/ ─▶ training data (every state, distinct candidates)
        ├─ on the critic's channels (its config.json): models/critic/ ─▶ A = max(Q1,Q2) − max(V1,V2), once, frozen
        │                                              (digirl: DigiRL's own values ─▶ W, digiq/digirl.py)
        └─ on actor.inputs: the policy's x_V(s), x_Q(s, a_k) ─▶ train_actor(method) ─▶ models/actor/<method>/
    outputs: models/actor/<method>/{model.safetensors, config.json, metrics.json, policy_scores.parquet}
             metrics/actor/<method>.json, dvclive/actor/<method>/ (loss per logged update)

The policy trains on the trajectories the critic trained on; the critic's held-out trajectories (critic.val_fraction,
the same seeded split) are never trained on and measure how far π strays from π_β there (kl_prior_heldout) and how
well it predicts the method's target (heldout_target_ce): the numbers actor.anchor is chosen on. Truncated last
steps are kept: imitation needs no s'. digiq, awr, awr-bon, pg-bon and reinforce need the critic; bc and
filtered-bc use it when it exists (only to report the mean advantage of the imitated actions). Same seed →
identical weights, scores and metrics (except ``timings_s``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq.atomic import atomic_path, write_json

if TYPE_CHECKING:
    from digiq.config import Params

POLICY_SCORES = "policy_scores.parquet"
METRICS_FILE = "metrics.json"
CURVES = ("loss", "imitation_loss", "anchor_loss", "grad_norm")


@dataclass
class ActorOutcome:
    metrics: dict[str, Any]
    out: Path
    history: list[dict[str, float]]


def open_live(directory: str) -> Any:
    from dvclive import Live

    return Live(directory, save_dvc_exp=False, dvcyaml=False, report=None)


def run(params: Params, *, method: str, progress: bool = False) -> ActorOutcome:
    """Train the ``method`` policy; write its folder (weights, config, metrics, policy scores) and the metrics file."""
    import pyarrow.parquet as pq
    import torch

    from digiq.actor import NEEDS_CRITIC, actor_record, check_dims, load_critic, policy_scores, train_actor
    from digiq.critic import advantage
    from digiq.runtime import set_threads
    from digiq.stage_outputs import finite_or_none, live_curves
    from digiq.training_data import read_training_data, split_trajectories

    p = params.actor
    actor_record(p, method)  # an unknown method fails before anything is read
    started = time.perf_counter()
    threads = set_threads()  # 128 states × K candidates per update: enough work for every core
    critic = load_critic(params.critic.out, required=method in NEEDS_CRITIC)
    vlm_only = p.inputs.vlm_only and (critic is None or critic.config.inputs.vlm_only) and params.critic.inputs.vlm_only
    data = read_training_data(params.features, channels=None if vlm_only else params.channels.out)
    composed: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}

    def transitions_on(inputs: Any) -> Any:
        """Every row composed on ``inputs``, once per distinct channel selection (each is K × width floats a row)."""
        key = (tuple(inputs.q), tuple(inputs.v))
        if key not in composed:
            composed[key] = data.transitions(inputs=inputs)
        return composed[key]

    transitions = transitions_on(p.inputs)
    advantages = weights = None
    extra: dict[str, Any] = {}
    if critic is not None:  # A on the critic's own channels, whatever the policy reads
        critic_view = transitions_on(critic.config.inputs)
        check_dims(critic, critic_view, params.critic.out)
        advantages = advantage(critic, critic_view.s, critic_view.cand_sa)
    if method == "digirl":
        from digiq.digirl import DigirlParams, digirl_weights

        digirl = getattr(params, "digirl", None) or DigirlParams()
        weights, extra = digirl_weights(data, transitions_on(params.critic.inputs), digirl, params.gamma, params.seed)
    held_out = torch.from_numpy(split_trajectories(data.traj_id, params.critic.val_fraction, params.seed))
    loaded = time.perf_counter()
    with live_curves(Path(p.live_dir) / method, CURVES, open_live) as log_fn:
        train_start = time.perf_counter()  # training time excludes DVCLive's start-up
        policy, selection, history = train_actor(transitions, p, None, log_fn, method=method, seed=params.seed,
                                                 advantages=advantages, weights=weights, held_out=held_out,
                                                 show_progress=progress)
        trained = time.perf_counter()
    metrics = finite_or_none({
        "method": method, "variant": params.features.variant, "updates": p.updates, "used_critic": critic is not None,
        "anchor": p.anchor,
        "mean_advantage_kept": None,  # same keys with or without a critic (null: no critic to ask)
        **selection, **({"digirl": extra} if extra else {}),
        "timings_s": {"load": round(loaded - started, 3), "train": round(trained - train_start, 3),
                      "updates_per_s": round(p.updates / max(trained - train_start, 1e-9), 3), "threads": threads},
    })
    out = Path(p.out) / method
    with atomic_path(out) as tmp:
        policy.save_pretrained(tmp)
        write_json(tmp / METRICS_FILE, metrics)
        pq.write_table(policy_scores(policy, data, transitions), tmp / POLICY_SCORES)
    write_json(Path(p.metrics) / f"{method}.json", metrics)
    return ActorOutcome(metrics=metrics, out=out, history=history)
