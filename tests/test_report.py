"""`digiq report` from synthetic metric files: numbers in both outputs, notes for missing inputs, no external URL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from digiq.errors import DigiqError
from digiq.evaluate import wilson_interval
from digiq.pipelines import report as stage
from digiq.report import ReportParams, ablation_section, render_html, svg_bars


def _summary(wins: int, n: int, steps: float) -> dict:
    low, high = wilson_interval(wins, n)
    return {"episodes": n, "successes": wins, "success": wins / n, "ci95": [round(low, 4), round(high, 4)], "mean_steps": steps}


def _eval() -> dict:
    tasks = ["click-button", "login-user"]
    methods = {}
    scores = {"digiq": (45, 30), "bc": (40, 12), "critic-greedy": (25, 3), "behavior": (30, 5), "random": (20, 1)}
    for name, (a, b) in scores.items():
        per_task = {"click-button": _summary(a, 50, 2.0), "login-user": _summary(b, 50, 6.5)}
        methods[name] = {**_summary(a + b, 100, 4.25), "per_task": per_task}
    return {"methods": methods, "tasks": tasks, "episodes_per_task": 50, "seed": 1000, "k": 16}


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


def _no_external_urls(page: str) -> None:
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert all("http" not in r and "//" not in r for r in refs), refs
    assert "<script" not in page and "<link" not in page


def test_report_with_every_input(tmp_path):
    params = _write(tmp_path, with_optional=True)
    md_path, html_path = stage.run(params, tmp_path / "params.yaml")
    md, page = md_path.read_text(), html_path.read_text()
    for text in (md, page):
        # digiq: 75 of 100; Wilson by hand: c = (0.75 + 0.019207)/1.038415 = 0.74077, h = 0.08380 → [65.7, 82.5]
        assert "75.0 %" in text and "[65.7, 82.5]" in text
        assert "60.0 %" in text and "24.0 %" in text  # per task: login-user digiq 30/50, bc 12/50
        assert "71.2" in text and "58" in text and "different benchmark" in text  # paper numbers, marked
        assert "41.5 %" in text  # label balance
        assert "0.6789" in text and "0.0123" in text  # critic diagnostics
        critic = text[text.index("Critic diagnostics"):]  # the critic alone (28 of 100) against π_β's sample (35 of 100)
        assert "below π_β" in critic and "28.0 %" in critic and "35.0 %" in critic
        assert "FAILED" in text and "Yes fraction in band" in text  # the failed data check
        assert "sha256:" in text and "gamma: 0.95" in text  # hashes computed (no dvc.lock) and params
        assert "No ablation results" in text
    assert md.count("data:image/svg+xml;base64,") >= 1
    _no_external_urls(page)
    assert page.count("<figure>") >= 1


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


def test_missing_optional_inputs_become_notes(tmp_path):
    params = _write(tmp_path, with_optional=False)
    _, html_path = stage.run(params, tmp_path / "params.yaml")
    page = html_path.read_text()
    assert "label.json is missing" in page and "critic.json is missing" in page and "No result.json found" in page
    assert "models/actor</td><td>missing" in page
    _no_external_urls(page)


def test_missing_or_bad_eval_is_one_error_and_writes_nothing(tmp_path):
    params = _write(tmp_path, with_optional=False)
    Path(params.eval).unlink()
    with pytest.raises(DigiqError, match="eval.json: missing"):
        stage.run(params, tmp_path / "params.yaml")
    Path(params.eval).write_text(json.dumps({"methods": {"digiq": {"ci95": [0, 1]}}}))
    with pytest.raises(DigiqError, match="eval.json: unexpected layout"):
        stage.run(params, tmp_path / "params.yaml")
    assert not Path(params.out_md).exists() and not Path(params.out_html).exists()


def test_ablation_table_from_exp_show_rows():
    rows = [{"Experiment": f"n{n}", "rev": f"r{n}", "actor.n": float(n), "critic.target": "td",
             "methods.digiq.success": s, "methods.bc.success": 0.3, "methods.digiq.per_task.x.success": 0.9}
            for n, s in [(1, 0.3), (4, 0.4), (16, 0.5)]]
    blocks = ablation_section(rows)
    t = next(b for b in blocks if b.kind == "table")
    assert t.headers[-2:] == ["bc success", "digiq success"]
    assert [r[0] for r in t.rows] == ["n1", "n4", "n16"] and t.rows[2][1] == "16" and t.rows[2][-1] == "50.0 %"
    assert any(b.kind == "plot" for b in blocks)  # the N curve
    _no_external_urls(render_html("t", blocks))


def test_svg_bars_scale_values_and_intervals():
    svg = svg_bars([("a", 0.5, 0.25, 0.75)], "t", width=470)  # plot area 170 … 410 (240 px)
    assert 'width="120.0"' in svg  # the bar: 0.5 × 240
    assert 'x1="230.0" y1="41.0" x2="350.0" y2="41.0"' in svg  # the whisker from 0.25 to 0.75 at the bar centre (30 + 22/2)


def test_cli_report(tmp_path, monkeypatch):
    from digiq.cli import report as cli

    params = _write(tmp_path, with_optional=True)
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    cli.register(app)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["report", "--eval", params.eval, "--md", "out/r.md", "--html", "out/r.html",
                                      "--no-experiments", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out/r.html").exists()
    bad = CliRunner().invoke(app, ["report", "--eval", "nope.json", "--params", str(tmp_path / "params.yaml")])
    assert bad.exit_code == 2 and "nope.json: missing" in bad.output
