"""`digiq evaluate`: every method acts live in MiniWoB++ on seeds never used in collection.

Outputs (paths from the ``evaluate:`` params): ``metrics/eval.json`` (per protocol, sample and greedy: per method
pooled success with a 95 % Wilson interval, mean episode length, episodes, the same per task; the paired McNemar
comparisons of evaluate.reference with each other method; timings), ``plots/eval.csv`` (protocol, method, task,
success, ci_low, ci_high, episodes) and the resumable result shards under ``data/eval/``
(:mod:`digiq.eval_runner`).
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import TYPE_CHECKING, Any

from digiq.atomic import write_json, write_text
from digiq.eval_runner import Evaluation, check, fingerprints, plot_rows, run_methods, summarise

if TYPE_CHECKING:
    from digiq.config import Params


def run(params: Params, *, progress: bool = False) -> dict[str, Any]:
    """Evaluate every method under every protocol (resuming from finished shards); write eval.json and the plot CSV; return the metrics."""
    evaluation = Evaluation.of(params)
    check(evaluation)
    evaluation = dataclasses.replace(evaluation, feature_cache=str(evaluation.scratch))
    prints = fingerprints(evaluation)
    timing = run_methods(evaluation, prints, progress=progress)
    metrics = summarise(evaluation, prints, timing)
    write_json(evaluation.settings.out, metrics)
    write_text(evaluation.settings.plots, plot_rows(metrics))
    shutil.rmtree(evaluation.scratch, ignore_errors=True)  # the live features every method shared (kept for a resume)
    return metrics
