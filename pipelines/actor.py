"""DVC stage `actor` (foreach over params.actor.methods): extract a policy from the frozen features + the critic.

    data/embeddings/<variant>/, data/features/<variant>/ ─▶ training data (every state, distinct candidates)
    models/critic/ ─▶ advantages A = max(Q1,Q2) − max(V1,V2) ─▶ train_actor(method) ─▶ models/actor/<method>/
    outputs: models/actor/<method>/{model.safetensors, config.json, metrics.json, policy_scores.parquet}
             metrics/actor/<method>.json, dvclive/actor/<method>/ (loss per logged update)

The policy is trained on every state the store serves (the critic's validation split exists to validate the
critic; the policy is judged online). Truncated last steps are kept: imitation needs no s'. ``digiq``, ``awr`` and
``reinforce`` need the critic; ``bc`` and ``filtered-bc`` use it when it exists (only to report the mean advantage of
the imitated actions). Same seed → identical weights, scores and metrics (except ``timings_s``).
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
CURVES = ("loss", "grad_norm")


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

    from digiq.actor import NEEDS_CRITIC, actor_record, check_dims, load_critic, policy_scores, train_actor
    from digiq.runtime import set_threads
    from digiq.stage_outputs import finite_or_none, live_curves
    from digiq.training_data import read_training_data

    p = params.actor
    actor_record(p, method)  # an unknown method fails before anything is read
    started = time.perf_counter()
    threads = set_threads()  # 128 states × K candidates per update: enough work for every core
    critic = load_critic(params.critic.out, required=method in NEEDS_CRITIC)
    data = read_training_data(params.features)
    if critic is not None:
        check_dims(critic, data, params.critic.out)
    loaded = time.perf_counter()
    with live_curves(Path(p.live_dir) / method, CURVES, open_live) as log_fn:
        train_start = time.perf_counter()  # training time excludes DVCLive's start-up
        policy, selection, history = train_actor(data.transitions(), p, critic, log_fn, method=method, seed=params.seed,
                                                 show_progress=progress)
        trained = time.perf_counter()
    metrics = finite_or_none({
        "method": method, "variant": params.features.variant, "updates": p.updates, "used_critic": critic is not None,
        "mean_advantage_kept": None,  # same keys with or without a critic (null: no critic to ask)
        **selection,
        "timings_s": {"load": round(loaded - started, 3), "train": round(trained - train_start, 3),
                      "updates_per_s": round(p.updates / max(trained - train_start, 1e-9), 3), "threads": threads},
    })
    out = Path(p.out) / method
    with atomic_path(out) as tmp:
        policy.save_pretrained(tmp)
        write_json(tmp / METRICS_FILE, metrics)
        pq.write_table(policy_scores(policy, data), tmp / POLICY_SCORES)
    write_json(Path(p.metrics) / f"{method}.json", metrics)
    return ActorOutcome(metrics=metrics, out=out, history=history)
