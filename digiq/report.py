"""The results report: Markdown plus one self-contained HTML page (inline SVG plots, no external URL).

A report is a list of blocks (headings, paragraphs, notes, tables, plots, code); :func:`render_markdown` and
:func:`render_html` write the same blocks. Section builders take already-loaded metric dicts (``None`` when
an input is missing: the section then says so instead of failing). Only ``eval.json`` is required.

Plots are SVG drawn here (bars with 95 % interval whiskers); the Markdown embeds them as ``data:`` images.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from digiq.errors import DigiqError
from digiq.evaluate import CRITIC_GREEDY

# DESIGN.md §1: AitW test success (General, WebShop) and WebShop ablations, in %.
PAPER_MAIN = {  # our method -> (paper row, General, WebShop)
    "behavior": ("AutoUI (the data's behaviour policy)", 22.9, 25.0),
    "filtered-bc": ("Filtered BC", 54.5, 43.8),
    "digiq": ("Digi-Q", 71.2, 58.0),
    "awr": ("AWR (WebShop ablation)", None, 19.4),
    "reinforce": ("REINFORCE (WebShop ablation)", None, 37.5),
}
PAPER_EXTRA = [("DigiRL offline", 59.0, 47.6), ("DigiRL online", 74.5, 57.3)]
PAPER_ABLATIONS = [("MC critic instead of TD", 37.5), ("off-the-shelf VLM", 31.9), ("no VLM representation", 47.6),
                   ("REINFORCE", 37.5), ("AWR", 19.4)]
ORIENTATION = "for orientation only: a different benchmark (Android-in-the-Wild), not comparable numbers"
ABLATION_PARAMS = ["actor.n", "critic.target", "features.variant", "label.epsilon"]


class ReportParams(BaseModel):
    """The ``report:`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    eval: str = Field("metrics/eval.json", description="online evaluation metrics (required)")
    label: str = Field("metrics/label.json", description="ε-label balance metrics")
    critic: str = Field("metrics/critic.json", description="critic diagnostics")
    checks: str = Field("data/checks", description="folder searched for Great Expectations result.json files")
    lock: str = Field("dvc.lock", description="DVC lock file with the data hashes")
    hash_paths: list[str] = Field(default_factory=lambda: ["data/raw", "data/labels.parquet", "models/critic", "models/actor"],
                                  description="paths hashed when dvc.lock is absent")
    experiments: bool = Field(True, description="read ablation results with dvc exp show")
    out_md: str = Field("reports/report.md", description="Markdown report")
    out_html: str = Field("reports/report.html", description="self-contained HTML report")


# ----------------------------------------------------------------------------------------------- blocks


@dataclass
class Block:
    kind: str  # h1 | h2 | p | note | table | plot | code
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


def p(text: str) -> Block:
    return Block("p", text)


def note(text: str) -> Block:
    return Block("note", text)


def table(headers: list[str], rows: list[list[Any]]) -> Block:
    return Block("table", headers=headers, rows=[[cell(v) for v in r] for r in rows])


def plot(svg: str, caption: str) -> Block:
    return Block("plot", caption, rows=[[svg]])


def code(text: str) -> Block:
    return Block("code", text)


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def ci(bounds: list[float] | None) -> str:
    return "–" if not bounds else f"[{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"


# ----------------------------------------------------------------------------------------------- SVG


def svg_bars(items: list[tuple[str, float, float, float]], title: str, width: int = 640, bar_h: int = 22) -> str:
    """Horizontal bars (label, value, ci_low, ci_high) on [0, 1] with interval whiskers, as standalone SVG."""
    left, right, top = 170, 60, 30
    plot_w = width - left - right
    height = top + bar_h * len(items) + 30
    x = lambda v: left + plot_w * min(max(v, 0.0), 1.0)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top - 4}" x2="{x(tick):.1f}" y2="{height - 24}" stroke="#ddd"/>')
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 10}" text-anchor="middle">{int(tick * 100)} %</text>')
    for i, (label, value, low, high) in enumerate(items):
        y = top + i * bar_h
        mid = y + bar_h / 2
        parts.append(f'<text x="{left - 6}" y="{mid + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{x(value) - left:.1f}" height="{bar_h - 6}" fill="#4c78a8"/>')
        parts.append(f'<line x1="{x(low):.1f}" y1="{mid:.1f}" x2="{x(high):.1f}" y2="{mid:.1f}" stroke="#222" stroke-width="1.5"/>')
        for end in (low, high):
            parts.append(f'<line x1="{x(end):.1f}" y1="{mid - 5:.1f}" x2="{x(end):.1f}" y2="{mid + 5:.1f}" stroke="#222"/>')
        parts.append(f'<text x="{x(max(value, high)) + 4:.1f}" y="{mid + 4:.1f}">{100 * value:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


# ----------------------------------------------------------------------------------------------- sections


def main_section(ev: dict[str, Any]) -> list[Block]:
    methods = ev.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise DigiqError("no per-method results (expected a 'methods' mapping)", field="methods")
    rows = []
    for name, m in methods.items():
        paper = PAPER_MAIN.get(name, (None, None, None))
        rows.append([name, pct(m["success"]), ci(m.get("ci95")), m.get("episodes"), f"{m.get('mean_steps', 0):.2f}",
                     paper[0], _paper(paper[1]), _paper(paper[2])])
    rows += [["–", "–", "–", "–", "–", name, _paper(gen), _paper(shop)] for name, gen, shop in PAPER_EXTRA]
    bars = [(name, m["success"], *m.get("ci95", [m["success"], m["success"]])) for name, m in methods.items()]
    return [
        h(2, "Main result: online success in MiniWoB++"),
        p(f"{ev.get('episodes_per_task', '?')} episodes per task and method on {len(ev.get('tasks', []))} tasks, "
          f"seeds disjoint from collection (evaluation seed {ev.get('seed', '?')}); K = {ev.get('k', '?')} candidates "
          f"from π_β per step. Success is pooled over tasks; brackets are 95 % Wilson intervals."),
        table(["method", "success", "95 % CI", "episodes", "mean steps", "paper row", "paper AitW General %", "paper WebShop %"], rows),
        note(f"Paper columns (DESIGN.md §1): {ORIENTATION}."),
        plot(svg_bars(bars, "Online success (95 % CI)"), "Online success per method with 95 % Wilson intervals."),
    ]


def _paper(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def per_task_section(ev: dict[str, Any]) -> list[Block]:
    methods = ev["methods"]
    tasks = ev.get("tasks") or sorted({t for m in methods.values() for t in m.get("per_task", {})})
    rows = []
    for task in tasks:
        row: list[Any] = [task]
        for m in methods.values():
            t = m.get("per_task", {}).get(task)
            row.append(f"{pct(t['success'])} {ci(t.get('ci95'))}" if t else "–")
        rows.append(row)
    steps = [[task, *[f"{m['per_task'][task]['mean_steps']:.2f}" if task in m.get("per_task", {}) else "–"
                      for m in methods.values()]] for task in tasks]
    return [h(2, "Per task"), table(["task", *methods], rows), p("Mean episode length (steps):"), table(["task", *methods], steps)]


def ablation_section(experiments: list[dict[str, Any]] | None, why_missing: str = "") -> list[Block]:
    blocks = [h(2, "Ablations (DVC experiments)")]
    if not experiments:
        return blocks + [note(f"No ablation results: {why_missing or 'no DVC experiments found'}. "
                              "Run them with e.g. `dvc exp run -S actor.n=4` (see README) and re-run `digiq report`."),
                         table(["paper ablation (WebShop)", "success %"], [[name, _paper(v)] for name, v in PAPER_ABLATIONS]),
                         note(f"Paper numbers: {ORIENTATION}.")]
    success_cols = sorted({m.group(1) for e in experiments for k in e if (m := _SUCCESS_KEY.search(k))})
    headers = ["experiment", *ABLATION_PARAMS, *[f"{c} success" for c in success_cols]]
    rows = []
    for e in experiments:
        found = {m.group(1): v for k, v in e.items() if (m := _SUCCESS_KEY.search(k))}
        rows.append([e.get("Experiment") or e.get("rev"), *[_param(e, k) for k in ABLATION_PARAMS],
                     *[pct(found[c]) if isinstance(found.get(c), (int, float)) else "–" for c in success_cols]])
    blocks.append(table(headers, rows))
    curve = sorted(((float(e["actor.n"]), _digiq_success(e)) for e in experiments
                    if isinstance(e.get("actor.n"), (int, float)) and _digiq_success(e) is not None), key=lambda t: t[0])
    if len(curve) > 1:
        blocks.append(plot(svg_bars([(f"N = {n:g}", s, s, s) for n, s in curve], "Digi-Q success against N"),
                           "Digi-Q success against the number of Best-of-N candidates (one bar per experiment)."))
    blocks += [table(["paper ablation (WebShop)", "success %"], [[name, _paper(v)] for name, v in PAPER_ABLATIONS]),
               note(f"Paper numbers: {ORIENTATION}.")]
    return blocks


_SUCCESS_KEY = re.compile(r"(?:^|[.:])methods\.([\w-]+)\.success$")


def _param(e: dict[str, Any], key: str) -> Any:
    value = e.get(key)
    return f"{value:g}" if isinstance(value, float) else value


def _digiq_success(e: dict[str, Any]) -> float | None:
    for k, v in e.items():
        m = _SUCCESS_KEY.search(k)
        if m and m.group(1) == "digiq" and isinstance(v, (int, float)):
            return float(v)
    return None


def label_section(label: dict[str, Any] | None, source: str) -> list[Block]:
    blocks = [h(2, "ε-label balance")]
    if label is None:
        return blocks + [note(f"{source} is missing: run `digiq label`.")]
    rows = [[kind, e.get("n"), pct(e.get("yes_fraction")), "–" if not e.get("band") else f"{e['band'][0]:g}–{e['band'][1]:g}"]
            for kind, e in label.get("per_kind", {}).items()]
    rows.append(["overall", label.get("labelled"), pct(label.get("yes_fraction")),
                 "–" if not label.get("yes_band") else f"{label['yes_band'][0]:g}–{label['yes_band'][1]:g}"])
    gate = label.get("gate", {})
    return blocks + [p(f"ε = {label.get('epsilon')}, downscale {label.get('scale')}; gate "
                       f"{'passed' if gate.get('success') else 'FAILED: ' + '; '.join(gate.get('failures', []))}."),
                     table(["action kind", "labelled", "Yes", "gate band"], rows)]


def critic_section(critic: dict[str, Any] | None, source: str, methods: dict[str, Any] | None = None) -> list[Block]:
    blocks = [h(2, "Critic diagnostics"), *critic_live_check(methods or {})]
    if critic is None:
        return blocks + [note(f"{source} is missing: run `digiq critic`.")]
    flat = [[k, v] for k, v in flatten(critic).items() if not k.startswith("diagnostics.")]
    return blocks + [table(["metric", "value"], flat)]


def critic_live_check(methods: dict[str, Any]) -> list[Block]:
    """The critic alone as a live policy (critic-greedy) against π_β's sample and its most-drawn candidate."""
    greedy = methods.get(CRITIC_GREEDY)
    if greedy is None:
        return []
    sample, mode = methods.get("behavior"), methods.get("behavior-mode")
    compared = [(what, m) for what, m in (("sample", sample), ("most-drawn candidate", mode)) if m is not None]
    if not compared:
        verdict = "not compared: evaluate behavior or behavior-mode alongside it"
    elif sample is not None and greedy["success"] < sample["success"]:
        verdict = ("below π_β's own sample: the critic ranks candidates worse than π_β's draw, so the critic, not the "
                   "extraction, limits every policy extracted from it")
    else:  # at or above the sample where it was evaluated: only the mode can still be above critic-greedy
        beaten = [what for what, m in compared if greedy["success"] >= m["success"]]
        parts = [f"at or above π_β's {beaten[-1]}"] if beaten else []
        if mode is not None and greedy["success"] < mode["success"]:
            parts.append("below π_β's most-drawn candidate")
        verdict = " but ".join(parts)
    rows = [[name, pct(m["success"]), ci(m.get("ci95"))] for name, m in
            ((CRITIC_GREEDY, greedy), ("behavior", sample), ("behavior-mode", mode)) if m is not None]
    return [p(f"The critic alone as a live policy (critic-greedy: argmax_k A(s, a_k) over the same K candidates of "
              f"π_β) is {verdict} (point estimates; the intervals are below)."), table(["chooser", "success", "95 % CI"], rows)]


def checks_section(results: dict[str, dict[str, Any]], folder: str) -> list[Block]:
    blocks = [h(2, "Data checks (Great Expectations)")]
    if not results:
        return blocks + [note(f"No result.json found under {folder}.")]
    rows = []
    for path, r in sorted(results.items()):
        items = r.get("results", [])
        passed = sum(bool(i.get("success")) for i in items)
        rows.append([path, r.get("suite"), "passed" if r.get("success") else "FAILED", f"{passed}/{len(items)}",
                     "; ".join(r.get("failures", [])) or "–"])
    return blocks + [table(["result file", "suite", "outcome", "checks passed", "failures"], rows)]


def provenance_section(params_text: str | None, hashes: list[list[str]], hash_source: str) -> list[Block]:
    blocks = [h(2, "Provenance: params and data hashes")]
    blocks += [p(f"Hashes: {hash_source}."), table(["stage / path", "hash"], hashes) if hashes else note("no hashes available")]
    blocks += [p("params.yaml:"), code(params_text)] if params_text is not None else [note("params.yaml is missing.")]
    return blocks


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif not isinstance(v, list) or len(v) <= 4:
            out[key] = v
    return out


# ----------------------------------------------------------------------------------------------- rendering


def render_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if b.kind.startswith("h"):
            out += ["#" * int(b.kind[1]) + f" {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "note":
            out += [f"> {b.text}", ""]
        elif b.kind == "table":
            out += ["| " + " | ".join(_md(x) for x in b.headers) + " |", "|" + "---|" * len(b.headers)]
            out += ["| " + " | ".join(_md(x) for x in r) + " |" for r in b.rows] + [""]
        elif b.kind == "plot":
            out += [f"![{b.text}]({svg_data_uri(b.rows[0][0])})", ""]
        elif b.kind == "code":
            out += ["```", b.text.rstrip("\n"), "```", ""]
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}.note{color:#555;border-left:3px solid #e0a800;"
        "padding-left:.6em}pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px}figure{margin:1em 0}")


def render_html(title: str, blocks: list[Block]) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>"]
    for b in blocks:
        if b.kind.startswith("h"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "note":
            out.append(f'<p class="note">{e(b.text)}</p>')
        elif b.kind == "table":
            head = "".join(f"<th>{e(x)}</th>" for x in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "plot":  # an <img> with a data: URI keeps the SVG's xmlns out of the page's markup
            out.append(f'<figure><img alt="{e(b.text)}" src="{svg_data_uri(b.rows[0][0])}"><figcaption>{e(b.text)}</figcaption></figure>')
        elif b.kind == "code":
            out.append(f"<pre>{e(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)
