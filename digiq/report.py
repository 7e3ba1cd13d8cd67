"""The results report: Markdown plus one self-contained HTML page (inline SVG charts, no external URL).

Evaluation results come per protocol (``sample``: each policy draws from its distribution, the paper's protocol;
``greedy``: argmax, with π_β's most-drawn candidate, behavior-mode, as the bar): a success table, the paired
McNemar tests of the reference method against each other one, and the per-task tables, for each protocol.

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
from digiq.evaluate import CRITIC_GREEDY, GREEDY_BAR

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


PROTOCOL_TITLES = {"sample": "sampled (each policy draws from its distribution, the paper's protocol)",
                   "greedy": "greedy (each policy takes its argmax)"}


def protocols(ev: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``protocols`` mapping of eval.json, each with a non-empty ``methods`` mapping."""
    tables = ev.get("protocols")
    if not isinstance(tables, dict) or not tables:
        raise DigiqError("no per-protocol results (expected a 'protocols' mapping)", field="protocols")
    for name, result in tables.items():
        if not isinstance(result.get("methods"), dict) or not result["methods"]:
            raise DigiqError(f"no per-method results in protocol {name!r}", field=f"protocols.{name}.methods")
    return tables


def main_section(ev: dict[str, Any]) -> list[Block]:
    tables = protocols(ev)
    blocks = [h(2, "Main result: online success in MiniWoB++"),
              p(f"Every method plays the same episodes of {len(ev.get('tasks', []))} tasks (seeds disjoint from "
                f"collection, evaluation seed {ev.get('seed', '?')}) and sees the same K = {ev.get('k', '?')} candidates "
                f"from π_β at every step where it is in the same state. Success is pooled over tasks; brackets are 95 % "
                f"Wilson intervals; p is the exact McNemar test of the paired episodes against "
                f"{_reference(tables)} (two-sided).")]
    for protocol, result in tables.items():
        blocks += protocol_table(protocol, result)
    return blocks


def _reference(tables: dict[str, Any]) -> str:
    return next((t["paired"]["reference"] for t in tables.values() if t.get("paired", {}).get("reference")), "the reference")


def protocol_table(protocol: str, result: dict[str, Any]) -> list[Block]:
    methods, against = result["methods"], result.get("paired", {}).get("against", {})
    paper_cols = protocol == "sample"
    rows = []
    for name, m in methods.items():
        test = against.get(name)
        row = [name + (" (the bar)" if name == result.get("bar") else ""), pct(m["success"]), ci(m.get("ci95")),
               m.get("episodes"), f"{m.get('mean_steps', 0):.2f}", "–" if test is None else p_value(test["p"])]
        paper = PAPER_MAIN.get(name, (None, None, None))
        rows.append(row + ([paper[0], _paper(paper[1]), _paper(paper[2])] if paper_cols else []))
    if paper_cols:
        rows += [["–"] * 6 + [name, _paper(gen), _paper(shop)] for name, gen, shop in PAPER_EXTRA]
    headers = ["method", "success", "95 % CI", "episodes", "mean steps", "p (paired)"]
    headers += ["paper row", "paper AitW General %", "paper WebShop %"] if paper_cols else []
    bars = [(name, m["success"], *m.get("ci95", [m["success"], m["success"]])) for name, m in methods.items()]
    blocks = [h(3, f"Protocol: {PROTOCOL_TITLES.get(protocol, protocol)}"),
              p(f"{result.get('episodes_per_task', '?')} episodes per task and method."), table(headers, rows)]
    if result.get("bar"):
        blocks.append(note(f"{result['bar']} (π_β's most-drawn candidate, what π_β does without its noise) is the greedy "
                           f"bar: a greedy policy over π_β's draws is worth its training where it clears it."))
    if paper_cols:
        blocks.append(note(f"Paper columns from the Digi-Q paper [1]: {ORIENTATION}; the paper's policies sample."))
    blocks.append(plot(charts.interval_bars(bars, f"Online success, {protocol} (95 % CI)", name=f"main-{protocol}"),
                       f"Online success per method, {protocol} protocol, with 95 % Wilson intervals."))
    return blocks + paired_table(protocol, result)


def paired_table(protocol: str, result: dict[str, Any]) -> list[Block]:
    """The reference against each other method of the protocol: discordant pairs, difference, exact McNemar p."""
    paired = result.get("paired") or {}
    against, reference = paired.get("against") or {}, paired.get("reference")
    if not against:
        return [note(f"No paired tests in the {protocol} protocol ({reference or 'the reference'} not evaluated in it).")]
    mine, methods = result["methods"].get(reference, {}), result["methods"]
    rows = [[f"{reference} vs {other}", t["n"], t["b"], t["c"], f"{100 * t['difference']:+.1f} pts",
             f"{pct(mine.get('success'))} {ci(mine.get('ci95'))}",
             f"{pct(methods.get(other, {}).get('success'))} {ci(methods.get(other, {}).get('ci95'))}", p_value(t["p"])]
            for other, t in against.items()]
    return [p(f"Paired comparisons, {protocol} protocol (pairs: the same task and seed):"),
            table(["comparison", "pairs", f"only {reference}", "only the other", "difference",
                         f"{reference} (95 % CI)", "other (95 % CI)", "p (exact McNemar)"], rows)]


def _paper(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def per_task_section(ev: dict[str, Any]) -> list[Block]:
    blocks = [h(2, "Per task")]
    for protocol, result in protocols(ev).items():
        blocks += per_task_tables(protocol, result, ev.get("tasks"))
    return blocks


def per_task_tables(protocol: str, result: dict[str, Any], tasks: list[str] | None) -> list[Block]:
    methods = result["methods"]
    tasks = tasks or sorted({t for m in methods.values() for t in m.get("per_task", {})})
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
    blocks = [h(3, f"Per task, {protocol} protocol"), table(["task", *methods], rows)]
    paired = result.get("paired") or {}
    if paired.get("against"):
        blocks += [p(f"{paired['reference']} minus each method, per task (episodes won only by {paired['reference']} minus "
                     f"those won only by the other, of the pairs; exact McNemar p in brackets):"),
                   table(["task", *paired["against"]],
                               [[task, *[_task_difference(t.get("per_task", {}).get(task)) for t in paired["against"].values()]]
                                for task in tasks])]
    return blocks + [plot(charts.success_grid(tasks, list(methods), grid, f"Success per task and method, {protocol}",
                                              name=f"per-task-{protocol}"),
                          f"Success per task and method, {protocol} protocol, in % (blank: not evaluated)."),
                     p("Mean episode length (steps):"), table(["task", *methods], steps)]


def _task_difference(t: dict[str, Any] | None) -> str:
    return "–" if not t or not t.get("n") else f"{t['b'] - t['c']:+d} of {t['n']} ({p_value(t['p'])})"


def ablation_section(experiments: list[dict[str, Any]] | None, why_missing: str = "") -> list[Block]:
    blocks = [h(2, "Ablations (DVC experiments)")]
    if not experiments:
        return blocks + [note(f"No ablation results: {why_missing or 'no DVC experiments found'}. Run them with e.g. "
                              "`dvc exp run -S actor.n=4` (see docs/experiments.md) and re-run `digiq report`."),
                         *paper_ablations()]
    success_cols = sorted({_column(m) for e in experiments for k in e if (m := _SUCCESS_KEY.search(k))})
    headers = ["experiment", *ABLATION_PARAMS, *[f"{c} success" for c in success_cols]]
    rows = []
    for e in experiments:
        found = {_column(m): v for k, v in e.items() if (m := _SUCCESS_KEY.search(k))}
        rows.append([e.get("Experiment") or e.get("rev"), *[_param(e, k) for k in ABLATION_PARAMS],
                     *[pct(found[c]) if isinstance(found.get(c), (int, float)) else "–" for c in success_cols]])
    blocks.append(table(headers, rows))
    curve = sorted((float(e["actor.n"]), success) for e in experiments
                   if isinstance(e.get("actor.n"), (int, float)) and (success := _digiq_success(e)) is not None)
    if len(curve) > 1:
        blocks.append(plot(charts.success_curve(curve, "Digi-Q (sampled) success against N", "N (Best-of-N candidates)",
                                                name="n-curve"),
                           "Digi-Q success (sample protocol) against the number of Best-of-N candidates (one point per "
                           "experiment)."))
    return blocks + paper_ablations()


def paper_ablations() -> list[Block]:
    return [table(["paper ablation (WebShop)", "success %"], [[name, _paper(v)] for name, v in PAPER_ABLATIONS]),
            note(f"Paper numbers from the Digi-Q paper [1]: {ORIENTATION}.")]


_SUCCESS_KEY = re.compile(r"(?:^|[.:])protocols\.(\w+)\.methods\.([\w-]+)\.success$")  # eval.json's pooled success


def _param(e: dict[str, Any], key: str) -> Any:
    value = e.get(key)
    return f"{value:g}" if isinstance(value, float) else value


def _column(match: re.Match[str]) -> str:
    return f"{match.group(2)} ({match.group(1)})"


def _digiq_success(e: dict[str, Any]) -> float | None:
    """Digi-Q's pooled success under the sample protocol (the paper's) in one experiment row."""
    for k, v in e.items():
        m = _SUCCESS_KEY.search(k)
        if m and m.groups() == ("sample", "digiq") and isinstance(v, (int, float)):
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


def live_choosers(ev: dict[str, Any]) -> dict[str, Any]:
    """critic-greedy and behavior-mode from the greedy table, behavior (π_β's sample) from the sample table."""
    tables = ev.get("protocols") or {}
    greedy, sample = ((tables.get(p) or {}).get("methods") or {} for p in ("greedy", "sample"))
    found = ((CRITIC_GREEDY, greedy.get(CRITIC_GREEDY)), ("behavior", sample.get("behavior")), (GREEDY_BAR, greedy.get(GREEDY_BAR)))
    return {name: m for name, m in found if m is not None}


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
    sample, mode = methods.get("behavior"), methods.get(GREEDY_BAR)
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
            note("p: two-sided Fisher exact test of equal success rates on the pooled episode counts."),
            *critic_per_task(greedy, mode)]


def critic_per_task(greedy: dict[str, Any], mode: dict[str, Any] | None) -> list[Block]:
    """Per task, critic-greedy's successes minus behavior-mode's (both greedy, the same episodes)."""
    if mode is None or not greedy.get("per_task"):
        return []
    rows = []
    for task, mine in greedy["per_task"].items():
        bar = mode.get("per_task", {}).get(task)
        if bar and "successes" in mine and "successes" in bar:
            rows.append([task, pct(bar["success"]), pct(mine["success"]),
                         f"{mine['successes'] - bar['successes']:+d} of {mine['episodes']}"])
    return [p("Per task, critic-greedy against the greedy bar (episodes won minus the bar's):"),
            table(["task", GREEDY_BAR, CRITIC_GREEDY, "difference"], rows)] if rows else []


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
