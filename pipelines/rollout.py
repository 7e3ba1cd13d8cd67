"""`digiq rollout`: run any policy online in MiniWoB++ and report success per task.

The policy is a :class:`~digiq.envs.policy.PolicySpec` — a registered name ("behavior") or
``package.module:factory`` with keyword arguments — built inside each worker process, so trained
policies plug in without touching this module. Tasks, workers and the episode settings are the
``collect`` section's; episode seeds are derived from (seed, task, episode), exactly as in `collect`:
use a seed the training data was not collected with to evaluate.
"""

from __future__ import annotations

from pathlib import Path

from digiq.atomic import write_json
from digiq.collection import RolloutResult, roll_out
from digiq.config import Params
from digiq.envs.policy import PolicySpec


def run(params: Params, *, policy: PolicySpec, episodes: int = 20, seed: int = 1000, out: str | Path | None = None,
        progress: bool = False) -> RolloutResult:
    """``episodes`` per task of ``policy``; the results are written as JSON to ``out`` when given."""
    result = roll_out(policy, params.collect, episodes=episodes, seed=seed, progress=progress)
    if out is not None:
        write_json(out, {**result.to_json(), "policy": {"name": policy.name, "kwargs": policy.kwargs},
                         "seed": seed, "max_steps": params.collect.max_steps, "episodes_per_task": episodes})
    return result
