"""DVC stage `candidates`: K candidate actions per state from π_β, de-duplicated once, + the action-diversity gate.

    data/raw ─▶ sample K per state (index 0 = dataset action) ─▶ semantic keys, draws ─▶ gate (GX) ─▶ data/candidates.parquet
                                                                                                  ─▶ metrics/candidates.json
                                                                                                  ─▶ data/checks/candidates/

When the gate fails the table is not written (metrics and Data Docs are, to show why).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq import candidates as C
from digiq.atomic import write_json

if TYPE_CHECKING:
    from digiq.config import Params


@dataclass
class CandidatesOutcome:
    metrics: dict[str, Any]
    seconds: float


def run(params: Params, *, progress: bool = False, report: Callable[[dict[str, Any]], None] | None = None) -> CandidatesOutcome:
    """Sample, gate, write. Raises DigiqError (after writing metrics + Data Docs) when the gate fails.

    π_β is the policy that collected the data: ``collect.behavior``'s changed heuristic weights, ``candidates.noise``."""
    from digiq.envs.behavior import BehaviorPolicy
    from digiq.store import Dataset

    p, dataset = params.candidates, Path(params.collect.out)
    started = time.perf_counter()
    policy = BehaviorPolicy(noise=p.noise, scores=params.collect.behavior)
    table = C.make_candidates(Dataset(dataset), p.k, p.seed, policy=policy, progress=progress)
    sampled_s = time.perf_counter() - started
    gate = C.check_diversity(table, p.min_mean_distinct, p.min_frac_two_distinct, docs_dir=Path(p.checks))
    metrics = {
        **C.diversity(table),
        "source": "imported action_list" if (dataset / C.IMPORTED_FILE).is_file() else "behaviour policy",
        "seed": p.seed,
        "noise": p.noise,
        "behavior": dict(params.collect.behavior),
        "sample_seconds": round(sampled_s, 3),
        "gate": {"success": gate.success, "failures": gate.failures,
                 "min_mean_distinct": p.min_mean_distinct, "min_frac_two_distinct": p.min_frac_two_distinct},
    }
    write_json(p.metrics, metrics)
    if report is not None:
        report(metrics)
    gate.raise_for_failures(dataset)
    C.write_candidates(table, p.out)
    return CandidatesOutcome(metrics=metrics, seconds=time.perf_counter() - started)
