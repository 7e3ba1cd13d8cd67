"""DVC stage `actor` (foreach over params.actor.methods): extract a policy from the frozen features + the critic.

    Feast (features/, variant) ─▶ training_frame ─▶ Transitions (every state, distinct candidates)
    models/critic/ ─▶ advantages A = max(Q1,Q2) − max(V1,V2) ─▶ train_actor(method) ─▶ models/actor/<method>/
    outputs: models/actor/<method>/{model.safetensors, config.json, metrics.json, policy_scores.parquet}
             metrics/actor/<method>.json, dvclive/actor/<method>/ (loss per logged update)

The policy is trained on every state the store serves (the critic's validation split exists to validate
the critic; the policy is judged online). Truncated last steps are kept: imitation needs no s'.
``digiq``, ``awr`` and ``reinforce`` need the critic; ``bc`` and ``filtered-bc`` use it when it exists
(only to report the mean advantage of the imitated actions). Same seed → identical weights, scores and
metrics (except ``timings_s``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digiq.atomic import atomic_path, write_json
from digiq.errors import DigiqError
from digiq.pipelines.critic import StageData, finite_or_none, live_curves, load_stage_data, write_parquet
from digiq.runtime import set_threads

if TYPE_CHECKING:
    from digiq.actor import ActorConfig, CandidatePolicy
    from digiq.config import Params
    from digiq.critic import DoubleCritic

METHODS = ("digiq", "bc", "filtered-bc", "awr", "reinforce")
NEEDS_CRITIC = ("digiq", "awr", "reinforce")
POLICY_SCORES = "policy_scores.parquet"
METRICS_FILE = "metrics.json"
CURVES = ("loss", "grad_norm")


def actor_config(params: Params, method: str) -> ActorConfig:
    """ActorConfig from params.actor (+ the global seed) for ``method``."""
    from digiq.actor import ActorConfig

    if method not in METHODS:
        raise DigiqError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})", field="method")
    return ActorConfig(method=method, seed=params.seed, **params.actor.model_dump(exclude={"methods", "out"}))


def load_critic(directory: str | Path, *, required: bool) -> DoubleCritic | None:
    """The trained critic at ``directory``; None when absent and not required (DigiqError when required)."""
    from digiq.critic import DoubleCritic

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        if required:
            raise DigiqError("no trained critic here (run `digiq critic` first)", file=directory / "config.json")
        return None
    return DoubleCritic.from_pretrained(directory)


def check_dims(critic: DoubleCritic, stage: StageData, critic_dir: Path) -> None:
    d_s, d_sa = stage.frame.state.shape[1], stage.frame.action.shape[1]
    if (critic.d_s, critic.d_sa) != (d_s, d_sa):
        raise DigiqError(f"critic expects d_s={critic.d_s}, d_sa={critic.d_sa} but the store serves {d_s}, {d_sa} "
                         "(trained on another variant? re-run `digiq critic`)", file=Path(critic_dir) / "config.json", field="dims")


def policy_scores(policy: CandidatePolicy, stage: StageData) -> Any:
    """pyarrow table: traj_id, step_id, cand_idx, action, draws, prob, chosen over every distinct candidate."""
    import pyarrow as pa
    import torch

    from digiq.critic import first_argmax
    from digiq.nn import map_chunks

    data = stage.transitions()
    logits = map_chunks(policy.logits, data.s, data.cand_sa, data.cand_mask, data.cand_count, device=next(policy.parameters()).device)
    prob = torch.softmax(logits, dim=-1).double().numpy()
    chosen = np.zeros(prob.shape, dtype=bool)
    chosen[np.arange(len(prob)), first_argmax(logits).numpy()] = True
    row, idx = np.nonzero(stage.distinct)
    return pa.table({
        "traj_id": pa.array(stage.traj_id[row].tolist(), pa.string()), "step_id": pa.array(stage.step_id[row], pa.int64()),
        "cand_idx": pa.array(idx, pa.int64()), "action": pa.array(stage.frame.candidate_actions[row, idx].tolist(), pa.string()),
        "draws": stage.draws[row, idx].astype(np.int64), "prob": prob[row, idx], "chosen": chosen[row, idx],
    })


@dataclass
class ActorOutcome:
    metrics: dict[str, Any]
    out: Path
    history: list[dict[str, float]]


def run(
    config: ActorConfig,
    *,
    repo: str | Path,
    variant: str,
    critic_dir: str | Path,
    out: str | Path,
    metrics_path: str | Path | None = None,
    live_dir: str | Path | None = None,
    progress: bool = False,
) -> ActorOutcome:
    """Train the ``config.method`` policy; write ``out`` (weights, config, metrics, policy scores) and the metrics file."""
    from digiq.actor import train_actor

    started = time.perf_counter()
    threads = set_threads()  # 128 states × K candidates per update: enough work for every core (1.4× with 2 here)
    critic = load_critic(critic_dir, required=config.method in NEEDS_CRITIC)
    stage = load_stage_data(repo, variant)
    if critic is not None:
        check_dims(critic, stage, Path(critic_dir))
    loaded = time.perf_counter()
    with live_curves(live_dir, curves=CURVES) as log_fn:
        train_start = time.perf_counter()  # training time excludes DVCLive's start-up
        policy, selection, history = train_actor(stage.transitions(), config, critic, log_fn, show_progress=progress)
        trained = time.perf_counter()
    metrics = finite_or_none({
        "method": config.method, "variant": variant, "updates": config.updates, "used_critic": critic is not None,
        "mean_advantage_kept": None,  # same keys with or without a critic (null: no critic to ask)
        **selection,
        "timings_s": {"load": round(loaded - started, 3), "train": round(trained - train_start, 3),
                      "updates_per_s": round(config.updates / max(trained - train_start, 1e-9), 3), "threads": threads},
    })
    out = Path(out)
    with atomic_path(out) as tmp:
        policy.save_pretrained(tmp)
        write_json(tmp / METRICS_FILE, metrics)
        write_parquet(policy_scores(policy, stage), tmp / POLICY_SCORES)
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return ActorOutcome(metrics=metrics, out=out, history=history)
