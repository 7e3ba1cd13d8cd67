"""DVC stage `candidates`: K candidate actions per state from π_β + the action-diversity gate.

    data/raw ─▶ sample K per state (index 0 = dataset action) ─▶ gate (GX) ─▶ data/candidates.parquet
                                                                          ─▶ metrics/candidates.json
                                                                          ─▶ data/checks/candidates/ (Data Docs)

When the gate fails the table is not written (metrics and Data Docs are, to show why).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from digiq import candidates as C
from digiq.atomic import write_json
from digiq.config import CandidatesParams, validated  # noqa: F401 - validated is used by cli/candidates.py
from digiq.store import Dataset


def candidates_params(params: Any) -> CandidatesParams:
    """The `candidates` section of loaded params."""
    return params.candidates


@dataclass
class CandidatesOutcome:
    metrics: dict[str, Any]
    seconds: float


def run(dataset: str | Path, p: CandidatesParams, *, behavior: Mapping[str, float] | None = None, progress: bool = False,
        report: Callable[[dict[str, Any]], None] | None = None) -> CandidatesOutcome:
    """Sample, gate, write. Raises DigiqError (after writing metrics + Data Docs) when the gate fails.

    ``behavior``: π_β's changed heuristic weights (params: collect.behavior), so that the candidates come from the
    policy that collected the data."""
    from digiq.envs.behavior import BehaviorPolicy

    started = time.perf_counter()
    data = Dataset(dataset)
    policy = BehaviorPolicy(noise=p.noise, scores=behavior)
    table = C.make_candidates(data, p.k, p.seed, policy=policy, progress=progress)
    sampled_s = time.perf_counter() - started
    imported = (Path(dataset) / C.IMPORTED_FILE).is_file()
    gate = C.check_diversity(table, p.min_mean_distinct, p.min_frac_two_distinct, docs_dir=Path(p.checks))
    metrics = {
        **C.diversity(table),
        "source": "imported action_list" if imported else "behaviour policy",
        "seed": p.seed,
        "noise": p.noise,
        "behavior": dict(behavior or {}),
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
