"""DVC stage `label`: ε-labels of visual change + the label-balance gate + the ε sweep (CSV for DVC plots).

Outputs (all atomic): the label table (Parquet, ``label.out``), ``label.metrics``, the gate's Data Docs +
result.json under ``label.checks``, and ``label_sweep.csv`` under ``label.plots``. When the gate fails the
label table is not written (stale labels never reach fine-tuning) but metrics, sweep and Data Docs are, to
show why. The input is the collected dataset, ``collect.out``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digiq import labels as L
from digiq.atomic import write_json
from digiq.config import Params
from digiq.label_outputs import SWEEP_CSV, SWEEP_PNG, kind_counts, label_metrics, write_sweep_csv, write_sweep_png
from digiq.store import Dataset


@dataclass
class LabelOutcome:
    metrics: dict[str, Any]
    gate: Any  # digiq.checks.SuiteResult
    sweep: Any  # pandas.DataFrame
    seconds: float


def run(params: Params, *, progress: bool = False, report: Callable[[dict[str, Any]], None] | None = None) -> LabelOutcome:
    """Label the dataset, gate the balance, write outputs; raises DigiqError (after writing diagnostics) on a failed gate.

    ``report(metrics)`` is called once the metrics exist, before the gate can raise (the CLI prints them).
    """
    section, dataset = params.label, params.collect.out
    started = time.perf_counter()
    run_ = L.make_labels(Dataset(dataset), section.epsilon, section.scale, section.resample, progress)
    gate, ungated = L.check_labels(run_.table, section, docs_dir=Path(section.checks))
    table = write_sweep_csv(L.sweep(run_.table, [*section.sweep_epsilons, section.epsilon]), Path(section.plots) / SWEEP_CSV)
    metrics = label_metrics(run_, section, ungated, gate)
    write_json(section.metrics, metrics)
    if report is not None:
        report(metrics)
    gate.raise_for_failures(dataset)  # before writing: labels that fail the gate never become the stage output
    L.write_labels(run_.table, section.out)
    return LabelOutcome(metrics=metrics, gate=gate, sweep=table, seconds=time.perf_counter() - started)


def run_sweep(params: Params, *, progress: bool = False) -> tuple[Any, dict[str, int], Path | None]:
    """Yes fraction vs ``label.sweep_epsilons`` without labelling: (sweep table, transitions per kind, PNG path or
    None); writes the CSV and the PNG under ``label.plots``."""
    section = params.label
    run_ = L.compute_mse(Dataset(params.collect.out), section.scale, section.resample, progress)
    table = write_sweep_csv(L.sweep(run_.table, section.sweep_epsilons), Path(section.plots) / SWEEP_CSV)
    png = write_sweep_png(table, Path(section.plots) / SWEEP_PNG, section.epsilon)
    return table, kind_counts(run_.table), png
