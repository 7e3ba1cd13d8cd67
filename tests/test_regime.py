"""`digiq data regime` on a hand-built dataset whose every figure is known by hand (digiq/regime.py).

Task "form", goal g, page E0 = buttons A (ref 5) and B (ref 6); E1 = E0 after A ("A pressed"); E2 = E0 after B.
Keys: A = tap@5 (taps a1, a2 at different points), B = tap@6, X = tap@none (off every control), C = complete.

    τ1 success  E0·()  a1 [A A B]      E1·(A)  B [B]
    τ2 failure  E0·()  B  [B B A]      E2·(B)  C [C C]
    τ3 success  E0·()  a2 [B A]        E1·(A)  X [B B]      E1·(X)  B [B]        (a2 ≠ a1 as text)
    τ4 failure  E0·()  B  [A A B]
    τ5 failure  E0·()  B  [B B X]
    τ6 failure  (task "dead") one step C [C]

Semantic states of "form": σ0 = E0·() {A, B}, σ1 = E1·(A) {B, X}, σ2 = E2·(B) {C}, σ3 = E1·(X) {B}: 4 states, 2 with
contrast. Exact states split σ1 by the tap's coordinates in the observation text: 5 states, 1 with contrast.
Modes (fresh draws, ties to the first drawn): A, B, B, C, B (tie B–A), B, B, A, B: agreement 6 of 9.
Supported corrections: τ2·0 (B = mode, σ0 left by A in τ1/τ3; A is 1 of 3 draws) and τ5·0 (B = mode, A not drawn);
τ4·0's mode is A (not mode-wrong); τ2·1's state no success left. So 2, covered 1 (50 %), mean share (1/3 + 0)/2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from digiq.actions import format_action
from digiq.candidates import candidate_table, write_candidates
from digiq.cli.main import app
from digiq.envs.view import observation_text
from digiq.regime import RegimeParams, check_regime, dataset_regime, regime_markdown
from digiq.schema import Action, Step, Trajectory
from digiq.store import DatasetWriter

runner = CliRunner()
GOAL = "Press A, then B."


def element(ref: int, tag: str, bbox: list[float], text: str = "", leaf: bool = True) -> dict:
    return {"bbox": bbox, "classes": "", "focused": False, "id": "", "leaf": leaf, "parent": 1, "ref": ref, "tag": tag,
            "tampered": False, "text": text, "value": None}


BODY = element(1, "body", [0.0, 0.0, 1.0, 1.0], leaf=False)
E0 = [BODY, element(5, "button", [0.1, 0.1, 0.3, 0.4], "A"), element(6, "button", [0.5, 0.1, 0.7, 0.4], "B")]
E1 = [*E0, element(7, "div", [0.8, 0.1, 0.85, 0.4], "A pressed")]
E2 = [*E0, element(7, "div", [0.8, 0.1, 0.85, 0.4], "B pressed")]
a1, a2, B, X = Action.tap(0.2, 0.2), Action.tap(0.25, 0.3), Action.tap(0.6, 0.2), Action.tap(0.95, 0.95)
A, C = a1, Action.simple("STATUS_TASK_COMPLETE")
EPISODES = [  # (traj_id, task, success, [(dom, action, fresh draws)])
    ("t1", "form", True, [(E0, a1, [A, A, B]), (E1, B, [B])]),
    ("t2", "form", False, [(E0, B, [B, B, A]), (E2, C, [C, C])]),
    ("t3", "form", True, [(E0, a2, [B, A]), (E1, X, [B, B]), (E1, B, [B])]),
    ("t4", "form", False, [(E0, B, [A, A, B])]),
    ("t5", "form", False, [(E0, B, [B, B, X])]),
    ("t6", "dead", False, [(E0, C, [C])]),
]


def write_regime_data(root: Path) -> tuple[Path, Path]:
    """data/raw and data/candidates.parquet of :data:`EPISODES` (the last step of a successful episode has r = 1)."""
    writer = DatasetWriter(root / "raw", gamma=0.5, source="hand-built")
    shot, sha = writer.put_image(np.zeros((4, 4, 3), dtype=np.uint8))
    trajectories, states = [], []
    for traj_id, task, success, steps in EPISODES:
        stored, history = [], []
        for t, (dom, action, draws) in enumerate(steps):
            last = t == len(steps) - 1
            step = Step(traj_id=traj_id, step_id=t, task=task, goal=GOAL, observation=observation_text(GOAL, history, 1),
                        screenshot=shot, screenshot_sha256=sha, elements=json.dumps(dom), action=action,
                        reward=float(success and last), done=last)
            stored.append(step)
            states.append(({"traj_id": traj_id, "step_id": t, "elements": step.elements},
                           [format_action(a) for a in (action, *draws)]))
            history.append(action)
        trajectories.append(Trajectory(traj_id=traj_id, task=task, goal=GOAL, steps=stored))
    writer.write_shard("hand", trajectories)
    writer.finalize()
    write_candidates(candidate_table(states), root / "candidates.parquet")
    return root / "raw", root / "candidates.parquet"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_regime_data(tmp_path_factory.mktemp("regime"))


def write_eval(path: Path, suite: float, form: float) -> Path:
    per_task = {"form": {"success": form, "episodes": 10}, "dead": {"success": 0.0, "episodes": 10}}
    method = {"success": suite, "episodes": 20, "per_task": per_task}
    path.write_text(json.dumps({"protocols": {"greedy": {"methods": {"behavior-mode": method}}}}))
    return path


def test_figures_by_hand(data):
    regime = dataset_regime(*data)
    form, dead, suite = regime["tasks"]["form"], regime["tasks"]["dead"], regime["suite"]
    assert (form["episodes"], form["successes"], form["steps"]) == (5, 2, 9)
    assert form["sample_success"] == pytest.approx(0.4)
    assert form["mean_success_horizon"] == pytest.approx(2.5) and form["mean_horizon"] == pytest.approx(9 / 5)
    assert form["mode_agreement"] == pytest.approx(6 / 9)
    assert (form["states"], form["contrast_states"]) == (4, 2) and form["contrast_fraction"] == pytest.approx(0.5)
    assert (form["supported_corrections"], form["corrections_covered"]) == (2, 1)
    assert form["correction_coverage"] == pytest.approx(0.5) and form["correction_share"] == pytest.approx(1 / 6)
    assert form["mode_success"] is None and regime["eval"] is None
    assert dead["sample_success"] == 0.0 and dead["mean_success_horizon"] is None and dead["correction_coverage"] is None
    assert (suite["episodes"], suite["states"], suite["supported_corrections"]) == (6, 5, 2)
    assert suite["sample_success"] == pytest.approx(1 / 3) and suite["mean_horizon"] == pytest.approx(10 / 6)
    assert suite["mode_agreement"] == pytest.approx(7 / 10)


def test_exact_identity_tells_jittered_histories_apart(data):
    form = dataset_regime(*data, identity="exact")["tasks"]["form"]
    assert (form["states"], form["contrast_states"], form["supported_corrections"]) == (5, 1, 2)


def test_mode_success_comes_from_evaluates_greedy_behavior_mode(data, tmp_path):
    regime = dataset_regime(*data, write_eval(tmp_path / "eval.json", 0.3, 0.6))
    assert regime["suite"]["mode_success"] == 0.3 and regime["tasks"]["form"]["mode_success"] == 0.6
    assert regime["tasks"]["form"]["mode_episodes"] == 10
    (tmp_path / "old.json").write_text(json.dumps({"methods": {"behavior": {"success": 0.5}}}))  # no greedy protocol
    assert dataset_regime(*data, tmp_path / "old.json")["suite"]["mode_success"] is None
    assert "| suite | 6 | 33.3 % | 70.0 % | not measured |" in regime_markdown(dataset_regime(*data))


def test_gate_names_the_task_and_the_band(data, tmp_path):
    regime = dataset_regime(*data)
    result = check_regime(regime, RegimeParams())
    assert not result.success
    assert sorted(result.failures) == sorted([
        "dead: successful episodes ≥ 15% (observed 0)",
        "suite: mean successful-episode length ≥ 5 steps (observed 2.5)",
    ])
    assert check_regime(regime, RegimeParams(min_task_success=0.0, min_success_horizon=2.5)).success
    measured = dataset_regime(*data, write_eval(tmp_path / "eval.json", 0.5, 0.6))
    result = check_regime(measured, RegimeParams(min_task_success=0.0, min_success_horizon=2.0, sample_success=(0.4, 0.5)))
    assert result.failures == ["suite: π_β sample success in the band [40%, 50%] (observed 0.3333)",
                               "suite: π_β greedy mode success ≤ 45% (observed 0.5)"]


def test_cli_prints_the_tables_json_and_gates(data, tmp_path):
    raw, candidates = data
    paths = ["--data", str(raw), "--candidates", str(candidates), "--eval", str(tmp_path / "none.json"),
             "--params", str(tmp_path / "none.yaml")]
    result = runner.invoke(app, ["data", "regime", *paths])
    assert result.exit_code == 0, result.output
    for text in ("π_β and horizons", "contrast and corrections (state identity: semantic)", "not measured"):
        assert text in result.stdout
    form = next(line for line in result.stdout.splitlines() if line.strip().startswith("form") and "%" in line)
    assert form.split()[1:] == ["5", "40.0%", "66.7%", "n/m", "2.50", "1.80"]
    result = runner.invoke(app, ["data", "regime", *paths, "--json", "--identity", "exact"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["identity"] == "exact" and printed["tasks"]["form"]["states"] == 5 and printed["gate"] is None
    result = runner.invoke(app, ["data", "regime", *paths, "--gate"])
    assert result.exit_code == 2
    assert "regime failed" in result.stderr and "dead: successful episodes ≥ 15%" in result.stderr
    result = runner.invoke(app, ["data", "regime", *paths, "--identity", "fuzzy"])
    assert result.exit_code == 2 and "regime.identity" in result.stderr and "Traceback" not in result.output


def test_a_candidate_table_of_other_data_is_refused(data, tmp_path):
    from digiq.errors import DigiqError

    raw, _ = data
    row = {"traj_id": "t1", "step_id": 0, "elements": json.dumps(E0)}
    write_candidates(candidate_table([(row, [format_action(a1), format_action(B)])]), tmp_path / "few.parquet")
    with pytest.raises(DigiqError, match=r"no candidates for state t1/1 \(9 of 10 steps\)"):
        dataset_regime(raw, tmp_path / "few.parquet")
