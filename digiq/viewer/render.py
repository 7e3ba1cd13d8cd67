"""HTML for the viewer: trajectory pages (static, one per trajectory), the index shell, markers and plots.

Markers are overlays the browser draws over the screenshot file: an SVG with the screenshot's own
pixel size as viewBox (so (y, x) in [0, 1] maps to (y·H, x·W)) for taps and swipes, and HTML badges
for typed text and key presses. The image itself is never re-encoded. Every value a page shows sits
in an element with a ``data-field`` attribute, so tests and scripts can read pages back.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from digiq.actions import describe_action
from digiq.schema import Action, Step, Trajectory
from digiq.viewer.tables import Candidate, Ranking, StepLabel, StepScore

if TYPE_CHECKING:
    from digiq.viewer.contributions import StepContributions

MAX_SHOT_WIDTH = 360  # CSS px; small screenshots (MiniWoB's 160×210) are shown at 2×
MAX_SHOT_HEIGHT = 560
SERIES = (  # (key, legend, CSS class) of the value plot
    ("mc_return", "G (observed discounted return)", "s-return"),
    ("v", "V(s)", "s-v"),
    ("q", "Q(s, a)", "s-q"),
)
KEY_BADGES = {"press_enter": "⏎ Enter", "press_back": "◁ Back", "press_home": "⌂ Home", "complete": "✓ task complete"}


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(value: float | None, digits: int = 3) -> str:
    """Fixed-point text of a value ("—" when absent); -0.000 prints as 0.000."""
    if value is None:
        return "—"
    rounded = round(value, digits)
    return f"{0.0 if rounded == 0 else rounded:.{digits}f}"


def json_for_script(obj: object) -> str:
    """JSON safe to embed in a <script> element or a .js file."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return text.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


@dataclass(frozen=True)
class Shot:
    href: str  # relative to the trajectory page
    width: int  # pixels of the image file
    height: int

    @property
    def display_width(self) -> int:
        return max(1, min(2 * self.width, MAX_SHOT_WIDTH, round(MAX_SHOT_HEIGHT * self.width / self.height)))


@dataclass(frozen=True)
class StepView:
    step: Step
    shot: Shot
    label: StepLabel | None = None
    score: StepScore | None = None
    critic: Ranking | None = None
    policy: Ranking | None = None
    contributions: StepContributions | None = None


@dataclass(frozen=True)
class TrajectoryView:
    trajectory: Trajectory
    steps: Sequence[StepView]
    index_href: str = "../index.html"
    prev_href: str | None = None
    next_href: str | None = None
    has_critic: bool = False
    has_candidates: bool = False
    has_policy: bool = False
    has_labels: bool = False
    channels: tuple[str, ...] = ()  # the critic's attributed input channels (contributions table columns)
    dataset_name: str = ""
    facts: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- markers


def svg_marks(action: Action, shot: Shot, *, mark: str, cls: str, tag: str = "") -> str:
    """The geometric part of an action's marker (tap ring, swipe arrow) in the screenshot's pixel space."""
    unit = min(shot.width, shot.height)
    data = f'class="mark {cls}" data-mark="{esc(mark)}"'
    if action.kind == "tap":
        y, x = action.touch_point
        cx, cy, r = x * shot.width, y * shot.height, 0.055 * unit
        side = -1 if "pol" in cls else 1  # policy tags on the left, candidate ranks on the right
        label = _svg_tag(tag, cx + side * r * 0.75, cy - r * 0.75, unit)
        return (
            f'<g {data}><circle class="ring" cx="{cx:.2f}" cy="{cy:.2f}" r="{r:.2f}"/>'
            f'<circle class="dot" cx="{cx:.2f}" cy="{cy:.2f}" r="{0.012 * unit:.2f}"/>{label}</g>'
        )
    if action.kind == "swipe":
        (y0, x0), (y1, x1) = action.touch_point, action.lift_point
        start, end = (x0 * shot.width, y0 * shot.height), (x1 * shot.width, y1 * shot.height)
        return (
            f'<g {data}><line class="shaft" x1="{start[0]:.2f}" y1="{start[1]:.2f}" x2="{end[0]:.2f}" y2="{end[1]:.2f}"/>'
            f'<circle class="dot" cx="{start[0]:.2f}" cy="{start[1]:.2f}" r="{0.015 * unit:.2f}"/>'
            f'<polygon class="head" points="{_arrow_head(start, end, 0.06 * unit)}"/>'
            f"{_svg_tag(tag, start[0], start[1] - 0.03 * unit, unit)}</g>"
        )
    return ""


def badge(action: Action, *, mark: str, cls: str, tag: str = "") -> str:
    """The text part of a marker (typed text, key presses) as an HTML badge over the screenshot."""
    if action.kind == "type":
        text = f"⌨ “{action.typed_text}”"
    elif action.kind in KEY_BADGES:
        text = KEY_BADGES[action.kind]
    else:
        return ""
    prefix = f'<b class="tag">{esc(tag)}</b> ' if tag else ""
    return f'<span class="badge mark {cls}" data-mark="{esc(mark)}">{prefix}{esc(text)}</span>'


def _svg_tag(tag: str, x: float, y: float, unit: float) -> str:
    if not tag:
        return ""
    return f'<text class="tag" x="{x:.2f}" y="{y:.2f}" font-size="{0.075 * unit:.2f}">{esc(tag)}</text>'


def _arrow_head(start: tuple[float, float], end: tuple[float, float], size: float) -> str:
    """Triangle with its tip at ``end``, pointing along start → end."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    base = (end[0] - ux * size, end[1] - uy * size)
    left = (base[0] - uy * size * 0.5, base[1] + ux * size * 0.5)
    right = (base[0] + uy * size * 0.5, base[1] - ux * size * 0.5)
    return " ".join(f"{px:.2f},{py:.2f}" for px, py in (end, left, right))


def screenshot_figure(view: StepView) -> str:
    """The screenshot with every marker of the step: dataset action, critic candidates, policy pick."""
    layers = []  # drawn in order: the dataset action last, on top
    if view.policy:
        layers += [(c.action, f"p{c.cand_idx}", "pol" + (" chosen" if c.chosen else ""), "π") for c in view.policy.candidates]
    if view.critic:
        layers += [(c.action, f"c{c.cand_idx}", "cand", str(c.rank)) for c in view.critic.candidates]
    layers.append((view.step.action, "a", "act", ""))
    shot = view.shot
    marks = "".join(svg_marks(a, shot, mark=m, cls=c, tag=t) for a, m, c, t in layers)
    badges = "".join(badge(a, mark=m, cls=c, tag=t) for a, m, c, t in layers)
    upscaled = " upscaled" if shot.display_width >= 2 * shot.width else ""
    return (
        f'<figure class="shot{upscaled}" style="width:{shot.display_width}px">'
        f'<img src="{esc(shot.href)}" width="{shot.width}" height="{shot.height}" loading="lazy" '
        f'alt="screenshot of step {view.step.step_id}">'
        f'<svg viewBox="0 0 {shot.width} {shot.height}" preserveAspectRatio="none" aria-hidden="true">{marks}</svg>'
        f'<div class="badges">{badges}</div></figure>'
    )


# ------------------------------------------------------------------------------------- value plot


def value_plot(series: dict[str, list[float | None]], *, width: int = 560, height: int = 180) -> str:
    """An inline SVG line plot of the given per-step series (None = no value at that step)."""
    left, right, top, bottom = 46, 40, 10, 24
    values = [v for points in series.values() for v in points if v is not None]
    if not values:
        return ""
    lo, hi = _padded_range(values)
    n = max(len(points) for points in series.values())

    def sx(i: int) -> float:
        return left + (width - left - right) * (i / (n - 1) if n > 1 else 0.5)

    def sy(v: float) -> float:
        return top + (height - top - bottom) * (hi - v) / (hi - lo)

    grid = "".join(
        f'<line class="grid" x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
        f'<text class="ytick" x="{left - 4}" y="{sy(t) + 3:.1f}">{_tick_text(t)}</text>'
        for t in _ticks(lo, hi)
    )
    xticks = "".join(
        f'<text class="xtick" x="{sx(i):.1f}" y="{height - 8}">{i}</text>' for i in range(0, n, max(1, math.ceil(n / 20)))
    )
    lines = []
    for key, legend, cls in SERIES:
        if key not in series:
            continue
        points = series[key]
        for run in _runs(points):
            coords = " ".join(f"{sx(i):.1f},{sy(points[i]):.1f}" for i in run)
            lines.append(f'<polyline class="{cls}" points="{coords}"/>')
        lines += [
            f'<circle class="{cls}" cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="3"><title>step {i} · {esc(legend)} = {num(v)}</title></circle>'
            for i, v in enumerate(points)
            if v is not None
        ]
    axis_label = f'<text class="xlabel" x="{width - 2}" y="{height - 8}">step</text>'
    return (
        f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="values along the trajectory">{grid}{xticks}{axis_label}{"".join(lines)}</svg>'
    )


def _padded_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values + [0.0]), max(values + [0.0])
    if hi - lo < 1e-9:
        hi = lo + 1.0
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]


def _tick_text(value: float) -> str:
    return f"{value:.6g}"


def _runs(points: list[float | None]) -> list[list[int]]:
    """Index runs of consecutive present values (a polyline breaks where a value is missing)."""
    runs: list[list[int]] = []
    for i, v in enumerate(points):
        if v is None:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# -------------------------------------------------------------------------------- trajectory page


def trajectory_page(view: TrajectoryView) -> str:
    traj = view.trajectory
    series: dict[str, list[float | None]] = {"mc_return": [s.step.mc_return for s in view.steps]}
    if view.has_critic:
        series["v"] = [s.score.v if s.score else None for s in view.steps]
        series["q"] = [s.score.q if s.score else None for s in view.steps]
    legend = "".join(f'<span class="key {cls}">{esc(name)}</span>' for key, name, cls in SERIES if key in series)
    body = (
        _page_header(view)
        + f'<section class="values"><h2>Values along the trajectory</h2><div class="legend">{legend}</div>{value_plot(series)}</section>'
        + "".join(step_section(s, view) for s in view.steps)
    )
    return _document(f"{traj.traj_id} · digiq view", body, css="../assets/viewer.css", scripts=["../assets/trajectory.js"], page="trajectory")


def _page_header(view: TrajectoryView) -> str:
    traj = view.trajectory
    nav = [f'<a id="back" href="{esc(view.index_href)}">← all trajectories</a>']
    if view.prev_href:
        nav.append(f'<a id="prev" href="{esc(view.prev_href)}" rel="prev">‹ previous</a>')
    if view.next_href:
        nav.append(f'<a id="next" href="{esc(view.next_href)}" rel="next">next ›</a>')
    facts = {
        "task": esc(traj.task),
        "steps": str(len(traj.steps)),
        "success": "✓ yes" if traj.success else "✗ no",
        "Σ reward": num(traj.total_reward),
        "return G₀": num(traj.steps[0].mc_return),
        **view.facts,
    }
    fact_html = "".join(f'<div><dt>{esc(k)}</dt><dd data-fact="{esc(k)}">{v}</dd></div>' for k, v in facts.items())
    toggles = ['<label><input type="checkbox" data-layer="act" checked> dataset action</label>']
    if view.has_candidates:
        toggles.append('<label><input type="checkbox" data-layer="cand"> critic top candidates</label>')
    if view.has_policy:
        toggles.append('<label><input type="checkbox" data-layer="pol" checked> policy choice</label>')
    return (
        f'<header><nav>{" · ".join(nav)}<span class="dataset">{esc(view.dataset_name)}</span></nav>'
        f'<h1 id="traj-id">{esc(traj.traj_id)}</h1><p class="goal">{esc(traj.goal)}</p>'
        f'<dl class="facts">{fact_html}</dl>'
        f'<div class="layers">markers: {"".join(toggles)} <span class="hint">hover a candidate row to see its marker</span></div></header>'
    )


def step_section(view: StepView, page: TrajectoryView) -> str:
    step = view.step
    flags = '<span class="flag done">done</span>' if step.done else ""
    if step.reward > 0:
        flags += '<span class="flag reward">reward</span>'
    details = (
        f'<p class="describe" data-field="describe">{esc(describe_action(step.action))}</p>'
        f'<code class="action-str" data-field="action">{esc(step.action)}</code>'
        f'<table class="kv">{_step_rows(view, page)}</table>'
        + (_critic_table(view) if view.critic else "")
        + (_contributions(view, page) if view.contributions else "")
        + (_policy_table(view) if view.policy else "")
    )
    return (
        f'<section class="step" id="step-{step.step_id}" data-step="{step.step_id}">'
        f'<h3><a href="#step-{step.step_id}">step {step.step_id}</a> <span class="kind">{esc(step.action.kind)}</span>{flags}</h3>'
        f'<div class="step-body">{screenshot_figure(view)}<div class="details">{details}</div></div></section>'
    )


def _step_rows(view: StepView, page: TrajectoryView) -> str:
    step = view.step
    rows = [("reward", "reward", num(step.reward)), ("done", "done", "yes" if step.done else "no"), ("return G", "mc_return", num(step.mc_return))]
    if page.has_labels:
        rows += [("ε-label", "label", _label_text(view.label)), ("pixel MSE", "mse", num(view.label.mse, 2) if view.label else "—")]
    if page.has_critic:
        score = view.score
        rows += [
            ("V(s)", "v", num(score.v if score else None)),
            ("Q(s, a)", "q", num(score.q if score else None)),
            ("advantage", "advantage", num(score.advantage if score else None)),
            ("TD error", "td_error", num(score.td_error if score else None)),
        ]
    return "".join(f'<tr><th>{esc(name)}</th><td data-field="{key}">{value}</td></tr>' for name, key, value in rows)


def _label_text(label: StepLabel | None) -> str:
    if label is None:
        return '<span class="muted">no label</span>'
    threshold = f" (ε = {num(label.epsilon, 1)})" if label.epsilon is not None else ""
    return f'<span class="label-{label.label.lower()}">{esc(label.label)}</span>{threshold}'


def _candidate_row(cand: Candidate, mark: str, cells: list[str], previous_rank: int) -> str:
    gap = ' class="gap"' if cand.rank > previous_rank + 1 else ""
    data = ' <span class="pill">dataset</span>' if cand.cand_idx == 0 else ""
    pick = ' <span class="pill pick">chosen</span>' if cand.chosen else ""
    tds = "".join(f"<td>{c}</td>" for c in cells)
    return (
        f'<tr data-mark="{mark}"{gap}><td>{cand.rank}</td>{tds}'
        f'<td title="{esc(cand.action)}">{esc(describe_action(cand.action))}{data}{pick}</td><td class="muted">#{cand.cand_idx}</td></tr>'
    )


def _critic_table(view: StepView) -> str:
    ranking = view.critic
    v = view.score.v if view.score else None
    rows, previous = [], 0
    for cand in ranking.candidates:
        advantage = cand.score - v if v is not None else None
        rows.append(_candidate_row(cand, f"c{cand.cand_idx}", [num(cand.score), num(advantage)], previous))
        previous = cand.rank
    data_rank = ranking.data_rank
    rank_text = f"dataset action ranked {data_rank} of {ranking.total}" if data_rank else "dataset action not among them"
    return (
        f'<table class="cands critic"><caption>Critic: top candidates by Q · <span data-field="data_rank">{rank_text}</span></caption>'
        f"<tr><th>#</th><th>Q</th><th>Q − V</th><th>action</th><th>cand</th></tr>{''.join(rows)}</table>"
    )


def _contributions(view: StepView, page: TrajectoryView) -> str:
    """The channel contributions of V(s), the dataset action and the candidates the critic table shows."""
    from digiq.viewer.contributions import contributions_table

    shown = [(0, "Q(s, a) dataset", "a")] + [(c.cand_idx, f"Q #{c.cand_idx} (rank {c.rank})", f"c{c.cand_idx}")
                                             for c in (view.critic.candidates if view.critic else ()) if c.cand_idx != 0]
    return contributions_table(view.contributions, page.channels, shown)


def _policy_table(view: StepView) -> str:
    ranking = view.policy
    chosen = ranking.chosen
    if chosen is None:
        head = "Policy: no choice recorded"
    else:
        same = " (the dataset action)" if chosen.cand_idx == 0 else ""
        head = (
            f'Policy picks <span data-field="policy_choice">{esc(describe_action(chosen.action))}</span>{same}, '
            f'p = <span data-field="policy_prob">{num(chosen.score)}</span>'
        )
    rows, previous = [], 0
    for cand in ranking.candidates:
        rows.append(_candidate_row(cand, f"p{cand.cand_idx}", [num(cand.score)], previous))
        previous = cand.rank
    return f'<table class="cands policy"><caption>{head}</caption><tr><th>#</th><th>prob</th><th>action</th><th>cand</th></tr>{"".join(rows)}</table>'


# ------------------------------------------------------------------------------------------- index


def index_page(title: str, subtitle: str, *, has_critic: bool) -> str:
    """The index shell; assets/index.js fills the table from data/index.js."""
    sorts = [("id", "trajectory id"), ("ret-desc", "return ↓"), ("ret-asc", "return ↑"), ("len-desc", "length ↓"), ("len-asc", "length ↑")]
    if has_critic:
        sorts += [("tderr-desc", "critic error (mean |TD|) ↓"), ("tderr-asc", "critic error (mean |TD|) ↑"), ("v0-desc", "V(s₀) ↓")]
    options = "".join(f'<option value="{k}">{esc(v)}</option>' for k, v in sorts)
    controls = (
        '<div class="controls">'
        '<label>task <select id="f-task"><option value="">all tasks</option></select></label>'
        '<label>success <select id="f-succ"><option value="">all</option><option value="1">successful</option>'
        '<option value="0">failed</option></select></label>'
        f'<label>sort <select id="f-sort">{options}</select></label>'
        '<label>id <input id="f-id" type="search" placeholder="substring" size="14"></label>'
        '<span id="count" aria-live="polite"></span></div>'
    )
    body = (
        f'<header><h1>{esc(title)}</h1><p class="goal">{esc(subtitle)}</p>{controls}</header>'
        '<noscript>The index needs JavaScript; trajectory pages are plain HTML under t/.</noscript>'
        '<table id="trajs" class="index"><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>'
        '<div class="pager"><button id="first">« first</button><button id="prev">‹ prev</button>'
        '<span id="page"></span><button id="next">next ›</button><button id="last">last »</button></div>'
    )
    return _document(f"{title} · digiq view", body, css="assets/viewer.css", scripts=["data/index.js", "assets/index.js"], page="index")


def _document(title: str, body: str, *, css: str, scripts: list[str], page: str) -> str:
    tags = "".join(f'<script src="{esc(src)}"></script>' for src in scripts)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(title)}</title><link rel="stylesheet" href="{esc(css)}"></head>'
        f'<body class="page-{page}">{body}{tags}</body></html>\n'
    )
