"""The report's charts: matplotlib figures written as inline SVG, byte-identical for the same input.

Each chart is drawn on a plain :class:`~matplotlib.figure.Figure` (no pyplot, no GUI backend) and saved with the SVG
backend, text kept as text (``svg.fonttype: none``), no date, and element ids hashed from a fixed salt; every id
is then prefixed with the chart's name, so that two charts inlined in one page never share one. matplotlib loads
on the first chart.
"""

from __future__ import annotations

import io
import re
from typing import Any

BAR = "#4c78a8"
INTERVAL = "#222222"
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_ID_REF = re.compile(r'(\bid="|href="#|url\(#)')


def svg(fig: Any, name: str, title: str) -> str:
    """``fig`` as an ``<svg>`` element for an HTML page: no XML prolog, DOCTYPE or RDF metadata; ids prefixed
    with ``name``."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "digiq-report"}):
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Title": title, "Date": None, "Creator": None, "Type": None, "Format": None})
    text = buf.getvalue()
    element = _METADATA.sub("", text[text.index("<svg"):]).strip()
    return _ID_REF.sub(lambda m: f"{m.group(1)}{name}-", element)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _percent_axis(axis: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def interval_bars(items: list[tuple[str, float, float, float]], title: str, name: str) -> str:
    """Horizontal bars (label, success, ci_low, ci_high) on [0, 1], top to bottom in the given order, each with its
    interval as a whisker and its value written beside it."""
    labels = [label for label, *_ in items]
    values = [value for _, value, _, _ in items]
    below = [max(value - low, 0.0) for _, value, low, _ in items]
    above = [max(high - value, 0.0) for _, value, _, high in items]
    fig = _figure(7.5, 0.9 + 0.32 * len(items))
    ax = fig.add_subplot()
    rows = range(len(items))
    ax.barh(rows, values, height=0.7, color=BAR, xerr=[below, above], ecolor=INTERVAL, capsize=3)
    for row, (_, value, _, high) in zip(rows, items):
        ax.text(max(value, high) + 0.01, row, f"{100 * value:.1f}", va="center", fontsize=9)
    ax.set_yticks(list(rows), labels)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    _percent_axis(ax.xaxis)
    ax.grid(axis="x", color="#dddddd")
    ax.set_axisbelow(True)
    ax.set_title(title)
    return svg(fig, name, title)


def success_curve(points: list[tuple[float, float]], title: str, xlabel: str, name: str) -> str:
    """Success (y, on [0, 1]) against a setting (x, log2 scale: N = 1, 2, 4, …), one marker per point."""
    xs = [x for x, _ in points]
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot()
    ax.plot(xs, [y for _, y in points], marker="o", color=BAR)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_ylim(0.0, 1.0)
    _percent_axis(ax.yaxis)
    ax.grid(color="#dddddd")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return svg(fig, name, title)


def success_grid(tasks: list[str], methods: list[str], success: list[list[float | None]], title: str, name: str) -> str:
    """A task × method grid of success rates (``success[task][method]``, None where not evaluated), each cell
    shaded by its rate and labelled with it in % (so no colour bar, which matplotlib would embed as a bitmap)."""
    import numpy as np

    grid = np.ma.masked_invalid(np.array([[np.nan if s is None else s for s in row] for row in success], dtype=float))
    fig = _figure(1.8 + 0.95 * len(methods), 0.9 + 0.36 * len(tasks))
    ax = fig.add_subplot()
    ax.pcolormesh(grid, cmap="Blues", vmin=0.0, vmax=1.0, edgecolors="white", linewidth=1)
    for (row, col), value in np.ndenumerate(grid.filled(np.nan)):
        if not np.isnan(value):
            ax.text(col + 0.5, row + 0.5, f"{100 * value:.0f}", ha="center", va="center", fontsize=9,
                    color="white" if value > 0.6 else "black")
    ax.set_xticks(np.arange(len(methods)) + 0.5, methods, rotation=30, ha="right")
    ax.set_yticks(np.arange(len(tasks)) + 0.5, tasks)
    ax.invert_yaxis()
    ax.tick_params(length=0)
    ax.set_title(title)
    return svg(fig, name, title)
