"""DVC stage `label`: ε-labels of visual change + the label-balance gate + the ε sweep (CSV for DVC plots).

Outputs (all atomic): the label table (Parquet), ``metrics/label.json``, the gate's Data Docs + result.json
under ``checks_dir``, and ``plots/label_sweep.csv``. When the gate fails the label table is not written
(stale labels never reach fine-tuning) but metrics, sweep and Data Docs are, to show why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digiq import labels as L
from digiq.atomic import atomic_path, write_json
from digiq.store import Dataset

SWEEP_CSV = "label_sweep.csv"
SWEEP_PNG = "label_sweep.png"
DEFAULT_EPSILONS = (5.0, 10.0, 20.0, 30.0, 50.0, 80.0)


@dataclass
class LabelOutcome:
    metrics: dict[str, Any]
    gate: Any  # digiq.checks.SuiteResult
    sweep: Any  # pandas.DataFrame
    seconds: float


def run(
    dataset: str | Path,
    out: str | Path,
    epsilon: float,
    scale: float,
    yes_band: tuple[float, float],
    kind_bands: dict[str, tuple[float, float]] | None = None,
    min_count: int = 30,
    resample: L.Resample = "box",
    sweep_epsilons: Sequence[float] = DEFAULT_EPSILONS,
    metrics_path: str | Path = "metrics/label.json",
    checks_dir: str | Path = "data/checks/label",
    plots_dir: str | Path = "plots",
    progress: bool = False,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> LabelOutcome:
    """Label ``dataset``, gate the balance, write outputs; raises DigiqError (after writing diagnostics) on a failed gate.

    ``report(metrics)`` is called once the metrics exist, before the gate can raise (the CLI prints them).
    """
    rule = L.BalanceRule(yes_band=tuple(yes_band), kind_bands=dict(kind_bands or {}), min_count=min_count)
    rule.validate()
    started = time.perf_counter()
    run_ = L.make_labels(Dataset(dataset), epsilon, scale, resample, progress)
    gate, ungated = L.check_labels(run_.table, rule, docs_dir=Path(checks_dir))
    table = write_sweep_csv(L.sweep(run_.table, [*sweep_epsilons, epsilon]), Path(plots_dir) / SWEEP_CSV)
    metrics = label_metrics(run_, epsilon, scale, resample, rule, ungated, gate)
    write_json(metrics_path, metrics)
    if report is not None:
        report(metrics)
    gate.raise_for_failures(dataset)  # before writing: labels that fail the gate never become the stage output
    L.write_labels(run_.table, out)
    return LabelOutcome(metrics=metrics, gate=gate, sweep=table, seconds=time.perf_counter() - started)


def run_sweep(
    dataset: str | Path,
    scale: float,
    epsilons: Sequence[float],
    resample: L.Resample = "box",
    plots_dir: str | Path | None = "plots",
    progress: bool = False,
    epsilon: float | None = None,
) -> tuple[Any, dict[str, int], Path | None]:
    """Yes fraction vs ε without labelling: (sweep table, transition count per kind, PNG path or None)."""
    run_ = L.compute_mse(Dataset(dataset), scale, resample, progress)
    table = L.sweep(run_.table, epsilons)
    counts = {k: int((run_.table["action_kind"] == k).sum()) for k in L.ordered_kinds(run_.table["action_kind"])}
    png = None
    if plots_dir is not None:
        write_sweep_csv(table, Path(plots_dir) / SWEEP_CSV)
        png = write_sweep_png(table, Path(plots_dir) / SWEEP_PNG, epsilon)
    return table, counts, png


def label_metrics(run_: L.LabelRun, epsilon: float, scale: float, resample: str, rule: L.BalanceRule, ungated: list[str], gate: Any) -> dict[str, Any]:
    """metrics/label.json: counts, Yes fractions overall and per kind, MSE quantiles, gate outcome."""
    summary = L.balance(run_.table)
    for kind, entry in summary["per_kind"].items():
        entry["gated"] = kind not in ungated
        entry["band"] = list(rule.band(kind)) if entry["gated"] else None
        entry["mse"] = L.mse_quantiles(run_.table.loc[run_.table["action_kind"] == kind, "mse"], qs=(0.25, 0.5, 0.75))
    return {
        "epsilon": float(epsilon),
        "scale": float(scale),
        "resample": resample,
        "steps": run_.total_steps,
        "labelled": summary["n"],
        "excluded": run_.excluded,
        "yes": summary["yes"],
        "yes_fraction": summary["yes_fraction"],
        "yes_band": list(rule.yes_band),
        "min_count": rule.min_count,
        "per_kind": summary["per_kind"],
        "mse": L.mse_quantiles(run_.table["mse"]),
        "screenshots_decoded": run_.decoded,
        "gate": {"success": gate.success, "failures": gate.failures},
    }


def write_sweep_csv(table: Any, path: Path) -> Any:
    """The sweep as CSV (one row per ε; DVC plots: x=epsilon, y=overall and each kind)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return table


def write_sweep_png(table: Any, path: Path, epsilon: float | None = None) -> Path | None:
    """A line plot of Yes fraction vs ε (the configured ε dashed) with matplotlib; None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for column in table.columns[1:]:
        ax.plot(table["epsilon"], table[column], marker="o", linewidth=2.5 if column == "overall" else 1.2, label=column)
    ax.set(xlabel="ε (downscaled pixel MSE threshold)", ylabel='fraction labelled "Yes"', ylim=(0, 1), title="ε-label balance")
    if epsilon is not None:
        ax.axvline(epsilon, color="grey", linestyle="--", linewidth=1, label=f"ε = {epsilon:g} (configured)")
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
