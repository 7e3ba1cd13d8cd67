"""What the label stage writes besides the label table: its metrics, and the ε sweep (CSV for DVC plots, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from digiq import labels as L
from digiq.atomic import atomic_path
from digiq.config import LabelParams

SWEEP_CSV = "label_sweep.csv"
SWEEP_PNG = "label_sweep.png"


def label_metrics(run: L.LabelRun, section: LabelParams, ungated: list[str], gate: Any) -> dict[str, Any]:
    """metrics/label.json: counts, Yes fractions overall and per kind, MSE quantiles, gate outcome."""
    summary = L.balance(run.table)
    for kind, entry in summary["per_kind"].items():
        entry["gated"] = kind not in ungated
        entry["band"] = list(section.band(kind)) if entry["gated"] else None
        entry["mse"] = L.mse_quantiles(run.table.loc[run.table["action_kind"] == kind, "mse"], qs=(0.25, 0.5, 0.75))
    return {
        "epsilon": float(section.epsilon),
        "scale": float(section.scale),
        "resample": section.resample,
        "steps": run.total_steps,
        "labelled": summary["n"],
        "excluded": run.excluded,
        "yes": summary["yes"],
        "yes_fraction": summary["yes_fraction"],
        "yes_band": list(section.yes_band),
        "min_count": section.min_count,
        "per_kind": summary["per_kind"],
        "mse": L.mse_quantiles(run.table["mse"]),
        "screenshots_decoded": run.decoded,
        "gate": {"success": gate.success, "failures": gate.failures},
    }


def kind_counts(mse_table: Any) -> dict[str, int]:
    """Transitions per action kind, in the usual kind order."""
    return {k: int((mse_table["action_kind"] == k).sum()) for k in L.ordered_kinds(mse_table["action_kind"])}


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
