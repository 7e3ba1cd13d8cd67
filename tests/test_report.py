"""`digiq report` from synthetic metric files: numbers in both outputs, notes for missing inputs, no external URL."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import command_app
from digiq.config import Params
from digiq.errors import DigiqError
from digiq.evaluate import wilson_interval
from digiq.pipelines import report as stage
from digiq.report import ReportParams, ablation_section, render_html, render_markdown
from digiq.report_charts import interval_bars


def _summary(wins: int, n: int, steps: float) -> dict:
    low, high = wilson_interval(wins, n)
    return {"episodes": n, "successes": wins, "success": wins / n, "ci95": [round(low, 4), round(high, 4)], "mean_steps": steps}


SAMPLE = {"digiq": (45, 30), "bc": (40, 12), "behavior": (30, 5), "random": (20, 1)}
GREEDY = {"digiq": (44, 26), "bc": (46, 20), "critic-greedy": (25, 3), "behavior-mode": (47, 23)}
PAIRED = {"sample": {"bc": (1, 9), "behavior": (20, 3), "random": (30, 0)},  # (b, c) of digiq against each
          "greedy": {"bc": (5, 9), "critic-greedy": (40, 1), "behavior-mode": (2, 2)}}


def _paired(b: int, c: int, n: int = 100) -> dict:
    from digiq.evaluate import mcnemar_p

    pooled = {"n": n, "b": b, "c": c, "p": mcnemar_p(b, c), "difference": (b - c) / n}
    return {**pooled, "per_task": {"click-button": {**pooled, "n": 50, "difference": (b - c) / 50}, "login-user": {
        "n": 50, "b": 0, "c": 0, "p": 1.0, "difference": 0.0}}}


def _eval() -> dict:
    tasks = ["click-button", "login-user"]
    tables = {}
    for protocol, scores in (("sample", SAMPLE), ("greedy", GREEDY)):
        methods = {}
        for name, (a, b) in scores.items():
            per_task = {"click-button": _summary(a, 50, 2.0), "login-user": _summary(b, 50, 6.5)}
            methods[name] = {**_summary(a + b, 100, 4.25), "per_task": per_task}
        tables[protocol] = {"episodes_per_task": 50, "methods": methods,
                            "paired": {"reference": "digiq", "against": {m: _paired(*bc) for m, bc in PAIRED[protocol].items()}},
                            **({"bar": "behavior-mode"} if protocol == "greedy" else {})}
    return {"protocols": tables, "tasks": tasks, "seed": 1000, "k": 64}


def _write(root: Path, with_optional: bool) -> ReportParams:
    (root / "metrics").mkdir(parents=True)
    (root / "metrics/eval.json").write_text(json.dumps(_eval()))
    (root / "params.yaml").write_text("seed: 0\ngamma: 0.95\n")
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/steps.parquet").write_bytes(b"not really parquet")
    if with_optional:
        (root / "metrics/label.json").write_text(json.dumps({
            "epsilon": 30.0, "scale": 0.25, "labelled": 200, "yes_fraction": 0.415, "yes_band": [0.15, 0.85],
            "per_kind": {"tap": {"n": 150, "yes_fraction": 0.5, "band": [0.15, 0.85]},
                         "type": {"n": 50, "yes_fraction": 0.16, "band": [0.15, 0.85]}},
            "gate": {"success": True, "failures": []}}))
        (root / "metrics/critic.json").write_text(json.dumps({"target": "td", "ranking_quality": 0.6789,
                                                              "train": {"q_loss": 0.0123}}))
        (root / "data/checks/label").mkdir(parents=True)
        (root / "data/checks/label/result.json").write_text(json.dumps({
            "suite": "labels", "success": False, "failures": ["Yes fraction in band (observed 0.9)"],
            "results": [{"success": True}, {"success": False}]}))
    return ReportParams(eval=str(root / "metrics/eval.json"), label=str(root / "metrics/label.json"),
                        critic=str(root / "metrics/critic.json"), checks=str(root / "data/checks"), lock=str(root / "dvc.lock"),
                        hash_paths=[str(root / "data/raw"), str(root / "models/actor")], experiments=False,
                        out_md=str(root / "reports/report.md"), out_html=str(root / "reports/report.html"))


ARXIV = "https://arxiv.org/abs/2502.15760"
NAMESPACES = re.compile(r'xmlns(?::\w+)?="http://www\.w3\.org/[\w/.]+"')  # XML namespace names: never fetched


def _no_external_urls(page: str) -> None:
    """Self-contained: no script, stylesheet link, image or frame; every href a fragment inside the page or the
    paper's arXiv link; no other URL anywhere (SVG namespace names aside)."""
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b|@import|\bsrc\s*=", page)
    refs = re.findall(r'href\s*=\s*"([^"]*)"', page)
    assert all(r.startswith("#") or r == ARXIV for r in refs), sorted(set(refs))
    assert not re.search(r"https?:|//[\w.-]+\.\w", NAMESPACES.sub("", page).replace(ARXIV, "")), "a URL in the page"


class _Tables(HTMLParser):
    """The page's tables as lists of rows of cell texts, in page order."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_report_with_every_input(tmp_path):
    params = _write(tmp_path, with_optional=True)
    md_path, html_path = stage.run(Params(report=params), params_path=tmp_path / "params.yaml")
    md, page = md_path.read_text(), html_path.read_text()
    for text in (md, page):
        # digiq: 75 of 100; Wilson by hand: c = (0.75 + 0.019207)/1.038415 = 0.74077, h = 0.08380 → [65.7, 82.5]
        assert "75.0 %" in text and "[65.7, 82.5]" in text
        assert "60.0 %" in text and "24.0 %" in text  # per task: login-user digiq 30/50, bc 12/50
        assert "Protocol: sampled" in text and "Protocol: greedy" in text
        assert "behavior-mode (the bar)" in text and "is the greedy bar" in text
        # digiq vs bc, sampled: b = 1, c = 9 → p = 2 · 11 / 1024 = 0.021; difference −8 points
        assert "0.021" in text and "−8.0 pts".replace("−", "-") in text
        assert "71.2" in text and "58" in text and "different benchmark" in text  # paper numbers, marked
        assert "41.5 %" in text  # label balance
        assert "0.6789" in text and "0.0123" in text  # critic diagnostics
        critic = text[text.index("Critic diagnostics"):]  # the critic alone (28 of 100, greedy) against π_β's sample (35 of 100)
        assert "below π_β" in critic and "28.0 %" in critic and "35.0 %" in critic
        assert "FAILED" in text and "Yes fraction in band" in text  # the failed data check
        assert "sha256:" in text and "gamma: 0.95" in text  # hashes computed (no dvc.lock) and params
        assert "No ablation results" in text
        assert "arXiv:2502.15760" in text and "DESIGN" not in text  # the paper is cited, no file readers lack
    assert md.count("](data:image/svg+xml;base64,") == 4  # per protocol: the main bars and the per-task grid
    _no_external_urls(page)
    assert page.count("<figure>\n<svg ") == page.count("<svg") == 4  # the charts, inline


def test_main_table_numbers_are_the_metrics(tmp_path):
    params = _write(tmp_path, with_optional=True)
    _, html_path = stage.run(Params(report=params), params_path=tmp_path / "params.yaml")
    tables = _Tables(html_path.read_text()).tables
    main = {"sample": tables[0], "greedy": next(t for t in tables[1:] if t[0][0] == "method")}
    for protocol, (header, *rows) in main.items():
        assert header[:6] == ["method", "success", "95 % CI", "episodes", "mean steps", "p (paired)"]
        result = _eval()["protocols"][protocol]
        methods, against = result["methods"], result["paired"]["against"]
        shown = {row[0].removesuffix(" (the bar)"): row[1:4] + row[5:6] for row in rows if row[0] != "–"}
        assert shown == {name: [f"{100 * m['success']:.1f} %", f"[{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]",
                                str(m["episodes"]), f"{against[name]['p']:.2g}" if name in against else "–"]
                         for name, m in methods.items()}
    # the paired table of the sample protocol: one row per other method, b and c as given
    paired = next(t for t in tables if t[0][0] == "comparison")
    assert [row[:4] for row in paired[1:]] == [[f"digiq vs {m}", "100", str(b), str(c)] for m, (b, c) in PAIRED["sample"].items()]


def test_per_task_paired_differences_are_shown(tmp_path):
    from digiq.report import per_task_section

    text = render_markdown("t", per_task_section(_eval()))
    assert "Per task, sample protocol" in text and "Per task, greedy protocol" in text
    # greedy digiq vs critic-greedy on click-button: b − c = 40 − 1 of 50 pairs, p = 2 · P(X ≤ 1 | 41, ½)
    from digiq.evaluate import mcnemar_p

    assert f"+39 of 50 ({mcnemar_p(40, 1):.2g})" in text


def test_critic_greedy_per_task_against_the_greedy_bar():
    from digiq.report import critic_live_check, live_choosers

    text = render_markdown("t", critic_live_check(live_choosers(_eval())))
    # click-button: critic-greedy 25 of 50, behavior-mode 47 of 50 → −22 of 50; login-user 3 vs 23 → −20
    assert "| click-button | 94.0 % | 50.0 % | -22 of 50 |" in text and "| login-user | 46.0 % | 6.0 % | -20 of 50 |" in text


def test_same_input_gives_byte_identical_reports(tmp_path):
    params = _write(tmp_path, with_optional=True)
    first = stage.run(Params(report=params), params_path=tmp_path / "params.yaml")
    again = params.model_copy(update={"out_md": str(tmp_path / "again.md"), "out_html": str(tmp_path / "again.html")})
    second = stage.run(Params(report=again), params_path=tmp_path / "params.yaml")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_critic_live_check_compares_only_what_was_evaluated():
    from digiq.report import critic_live_check, render_markdown

    def verdict(**successes):
        methods = {name.replace("_", "-"): {"success": x, "ci95": [x, x]} for name, x in successes.items()}
        return render_markdown("t", critic_live_check(methods))

    assert "below π_β's own sample" in verdict(critic_greedy=0.3, behavior=0.4, behavior_mode=0.6)
    assert "at or above π_β's sample but below π_β's most-drawn candidate" in verdict(critic_greedy=0.5, behavior=0.4, behavior_mode=0.6)
    assert "at or above π_β's most-drawn candidate (" in verdict(critic_greedy=0.7, behavior=0.4, behavior_mode=0.6)
    only_mode = verdict(critic_greedy=0.5, behavior_mode=0.6)  # no sample evaluated: no claim about it
    assert "below π_β's most-drawn candidate" in only_mode and "sample" not in only_mode
    assert "not compared" in verdict(critic_greedy=0.5) and verdict(behavior=0.4) == render_markdown("t", [])


def _fisher_two_sided(a: int, n_a: int, b: int, n_b: int) -> float:
    """Fisher's exact test written out: the hypergeometric tables with the same margins, no likelier than observed."""
    wins, total = a + b, n_a + n_b
    prob = [math.comb(n_a, k) * math.comb(n_b, wins - k) / math.comb(total, wins)
            for k in range(max(0, wins - n_b), min(n_a, wins) + 1)]
    observed = prob[a - max(0, wins - n_b)]
    return sum(q for q in prob if q <= observed * (1 + 1e-7))


def test_critic_check_tests_each_difference_with_fishers_exact_test():
    from digiq.report import critic_live_check

    methods = {name: {"success": wins / 100, "successes": wins, "episodes": 100, "ci95": [0, 1]}
               for name, wins in (("critic-greedy", 28), ("behavior", 35), ("behavior-mode", 52))}
    table = next(b for b in critic_live_check(methods) if b.kind == "table")
    assert table.headers[-1] == "p against critic-greedy"
    assert [row[-1] for row in table.rows] == ["–", f"{_fisher_two_sided(28, 100, 35, 100):.2g}",
                                               f"{_fisher_two_sided(28, 100, 52, 100):.2g}"]
    del methods["behavior"]["successes"]  # no counts: no test
    assert next(b for b in critic_live_check(methods) if b.kind == "table").rows[1][-1] == "–"


@pytest.mark.parametrize("n", [*range(1, 41), 50, 100, 400, 500])
def test_wilson_interval_gives_the_formulas_numbers(n):
    """scipy's interval, as the evaluate stage rounds it, equals the formula in digiq/evaluate.py written out."""
    z = 1.959963984540054
    for wins in range(n + 1):
        p, z2 = wins / n, z * z
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
        expected = (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))
        assert tuple(round(x, 4) for x in wilson_interval(wins, n)) == expected, (wins, n)


def test_missing_optional_inputs_become_notes(tmp_path):
    params = _write(tmp_path, with_optional=False)
    _, html_path = stage.run(Params(report=params), params_path=tmp_path / "params.yaml")
    page = html_path.read_text()
    assert "label.json is missing" in page and "critic.json is missing" in page and "No result.json found" in page
    assert "models/actor</td><td>missing" in page
    _no_external_urls(page)


def test_missing_or_bad_eval_is_one_error_and_writes_nothing(tmp_path):
    params = _write(tmp_path, with_optional=False)
    Path(params.eval).unlink()
    with pytest.raises(DigiqError, match="eval.json: missing"):
        stage.run(Params(report=params), params_path=tmp_path / "params.yaml")
    Path(params.eval).write_text(json.dumps({"protocols": {"sample": {"methods": {"digiq": {"ci95": [0, 1]}}}}}))
    with pytest.raises(DigiqError, match="eval.json: unexpected layout"):
        stage.run(Params(report=params), params_path=tmp_path / "params.yaml")
    assert not Path(params.out_md).exists() and not Path(params.out_html).exists()


def test_ablation_table_from_exp_show_rows():
    rows = [{"Experiment": f"n{n}", "rev": f"r{n}", "actor.n": float(n), "critic.target": "td",
             "protocols.sample.methods.digiq.success": s, "protocols.sample.methods.bc.success": 0.3,
             "protocols.greedy.methods.digiq.success": 0.9, "protocols.sample.methods.digiq.per_task.x.success": 0.9}
            for n, s in [(1, 0.3), (4, 0.4), (16, 0.5)]]
    blocks = ablation_section(rows)
    t = next(b for b in blocks if b.kind == "table")
    assert t.headers[-3:] == ["bc (sample) success", "digiq (greedy) success", "digiq (sample) success"]
    assert [r[0] for r in t.rows] == ["n1", "n4", "n16"] and t.rows[2][1] == "16" and t.rows[2][-1] == "50.0 %"
    assert any(b.kind == "plot" for b in blocks)  # the N curve
    _no_external_urls(render_html("t", blocks))


def test_charts_are_deterministic_inline_svg_with_their_own_ids():
    items = [("digiq", 0.5, 0.25, 0.75), ("random", 0.1, 0.05, 0.2)]
    svg = interval_bars(items, "Online success", name="main")
    assert svg == interval_bars(items, "Online success", name="main")  # no date, no random ids
    assert svg.startswith("<svg ") and svg.endswith("</svg>") and "<metadata" not in svg and "<image" not in svg
    assert "<title>Online success</title>" in svg and ">digiq</text>" in svg and ">50.0</text>" in svg  # text as text
    ids = re.findall(r'\bid="([^"]*)"', svg)
    refs = re.findall(r'(?:href="#|url\(#)([^")]*)', svg)
    assert ids and all(i.startswith("main-") for i in ids) and set(refs) <= set(ids)
    assert not set(ids) & set(re.findall(r'\bid="([^"]*)"', interval_bars(items, "t", name="other")))


def test_cli_report(tmp_path, monkeypatch):
    from digiq.cli import report as cli

    params = _write(tmp_path, with_optional=True)
    monkeypatch.chdir(tmp_path)
    app = command_app(cli)
    result = CliRunner().invoke(app, ["report", "-S", f"report.eval={params.eval}", "-S", "report.out_md=out/r.md",
                                      "-S", "report.out_html=out/r.html", "-S", "report.experiments=false",
                                      "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out/r.html").exists()
    bad = CliRunner().invoke(app, ["report", "-S", "report.eval=nope.json", "--params", str(tmp_path / "params.yaml")])
    assert bad.exit_code == 2 and "nope.json: missing" in bad.output
