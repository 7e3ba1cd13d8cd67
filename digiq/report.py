"""The results report: Markdown plus one self-contained HTML page (inline SVG charts, no external URL).

A report is a list of blocks (headings, paragraphs, notes, tables, charts, code) that the Jinja2 templates
``digiq/templates/report.md.j2`` and ``report.html.j2`` both render. Section builders take already-loaded metric
dicts (``None`` when an input is missing: the section then says so instead of failing). Only ``eval.json`` is
required. Charts come from matplotlib (:mod:`digiq.report_charts`); the Markdown embeds them as ``data:`` images.
The paper's numbers are cited from the paper itself (:data:`PAPER`), the only outside source a reader needs.
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from digiq import report_charts as charts
from digiq.errors import DigiqError
from digiq.evaluate import CRITIC_GREEDY

PAPER = "H. Bai et al., Digi-Q: Learning Q-Value Functions for Training Device-Control Agents, arXiv:2502.15760 (2025)"
PAPER_URL = "https://arxiv.org/abs/2502.15760"
# The paper's Android-in-the-Wild test success (General, Web Shopping) and its Web Shopping ablations, in %.
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
    kind: str  # h2 | h3 | p | note | table | plot | code
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    svg: str = ""  # plot: the chart as an <svg> element

    @property
    def data_uri(self) -> str:
        """The chart as a ``data:`` URI (for the Markdown, whose viewers do not render inline SVG)."""
        return "data:image/svg+xml;base64," + base64.b64encode(self.svg.encode()).decode()


def h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


def p(text: str) -> Block:
    return Block("p", text)


def note(text: str) -> Block:
    return Block("note", text)


def table(headers: list[str], rows: list[list[Any]]) -> Block:
    return Block("table", headers=headers, rows=[[cell(v) for v in r] for r in rows])


def plot(svg: str, caption: str) -> Block:
    return Block("plot", caption, svg=svg)


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
        note(f"Paper columns from the Digi-Q paper [1]: {ORIENTATION}."),
        plot(charts.interval_bars(bars, "Online success (95 % CI)", name="main"),
             "Online success per method with 95 % Wilson intervals."),
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
    grid = [[m.get("per_task", {}).get(task, {}).get("success") for m in methods.values()] for task in tasks]
    return [h(2, "Per task"), table(["task", *methods], rows),
            plot(charts.success_grid(tasks, list(methods), grid, "Success per task and method", name="per-task"),
                 "Success per task and method, in % (blank: not evaluated)."),
            p("Mean episode length (steps):"), table(["task", *methods], steps)]


def ablation_section(experiments: list[dict[str, Any]] | None, why_missing: str = "") -> list[Block]:
    blocks = [h(2, "Ablations (DVC experiments)")]
    if not experiments:
        return blocks + [note(f"No ablation results: {why_missing or 'no DVC experiments found'}. Run them with e.g. "
                              "`dvc exp run -S actor.n=4` (see docs/experiments.md) and re-run `digiq report`."),
                         *paper_ablations()]
    success_cols = sorted({m.group(1) for e in experiments for k in e if (m := _SUCCESS_KEY.search(k))})
    headers = ["experiment", *ABLATION_PARAMS, *[f"{c} success" for c in success_cols]]
    rows = []
    for e in experiments:
        found = {m.group(1): v for k, v in e.items() if (m := _SUCCESS_KEY.search(k))}
        rows.append([e.get("Experiment") or e.get("rev"), *[_param(e, k) for k in ABLATION_PARAMS],
                     *[pct(found[c]) if isinstance(found.get(c), (int, float)) else "–" for c in success_cols]])
    blocks.append(table(headers, rows))
    curve = sorted((float(e["actor.n"]), success) for e in experiments
                   if isinstance(e.get("actor.n"), (int, float)) and (success := _digiq_success(e)) is not None)
    if len(curve) > 1:
        blocks.append(plot(charts.success_curve(curve, "Digi-Q success against N", "N (Best-of-N candidates)", name="n-curve"),
                           "Digi-Q success against the number of Best-of-N candidates (one point per experiment)."))
    return blocks + paper_ablations()


def paper_ablations() -> list[Block]:
    return [table(["paper ablation (WebShop)", "success %"], [[name, _paper(v)] for name, v in PAPER_ABLATIONS]),
            note(f"Paper numbers from the Digi-Q paper [1]: {ORIENTATION}.")]


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
    rows = [[name, pct(m["success"]), ci(m.get("ci95")), "–" if m is greedy else p_value(fisher_p(greedy, m))]
            for name, m in ((CRITIC_GREEDY, greedy), ("behavior", sample), ("behavior-mode", mode)) if m is not None]
    return [p(f"The critic alone as a live policy (critic-greedy: argmax_k A(s, a_k) over the same K candidates of "
              f"π_β) is {verdict} (point estimates; their intervals, and a test of each difference, are below)."),
            table(["chooser", "success", "95 % CI", "p against critic-greedy"], rows),
            note("p: two-sided Fisher exact test of equal success rates on the pooled episode counts.")]


def fisher_p(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """p-value of the two-sided Fisher exact test that two methods succeed equally often, from their pooled
    (successes, episodes); None when either lacks the counts."""
    counts: list[tuple[Any, Any]] = [(m.get("successes"), m.get("episodes")) for m in (a, b)]
    if not all(isinstance(wins, int) and isinstance(n, int) and 0 <= wins <= n for wins, n in counts):
        return None
    from scipy.stats import fisher_exact

    return float(fisher_exact([[wins, n - wins] for wins, n in counts]).pvalue)


def p_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.2g}"


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


@functools.cache
def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("digiq", "templates"), undefined=jinja2.StrictUndefined,
                             autoescape=lambda name: name is not None and name.endswith(".html.j2"),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["md_cell"] = lambda text: text.replace("|", "\\|").replace("\n", " ")
    return env


def render(template: str, title: str, blocks: list[Block]) -> str:
    """``blocks`` through the package template ``template``, with the paper as reference [1]."""
    return _templates().get_template(template).render(title=title, blocks=blocks, references=[(PAPER, PAPER_URL)])


def render_markdown(title: str, blocks: list[Block]) -> str:
    return render("report.md.j2", title, blocks)


def render_html(title: str, blocks: list[Block]) -> str:
    return render("report.html.j2", title, blocks)
