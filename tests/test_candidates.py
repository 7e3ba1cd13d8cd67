"""Candidates from π_β on a real PNG dataset (DatasetWriter): determinism, order independence, index 0, the gate, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from digiq import candidates as C
from digiq.actions import format_action
from digiq.config import Params
from digiq.errors import DigiqError
from digiq.feature_contract import CANDIDATE_TABLE_SCHEMA, draw_counts, semantic_key
from digiq.pipelines.candidates import run
from digiq.schema import Action, ActionType, Step, Trajectory
from digiq.store import Dataset, DatasetWriter

GOAL = 'Enter "vina" into the text field and press Submit.'
W, H = 160, 210


def element(ref: int, tag: str, bbox: list[float], text: str = "", **kw) -> dict:
    return {"ref": ref, "parent": 1, "tag": tag, "bbox": bbox, "text": text, "id": kw.pop("id", ""), "classes": "",
            "focused": kw.pop("focused", False), "leaf": True, "tampered": False, "value": kw.pop("value", None), **kw}


def page(seed: int) -> tuple[Image.Image, list[dict]]:
    """A MiniWoB-like screen: a goal banner, a text field and two buttons at seeded places (+ their DOM)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, W, 50], fill=(255, 255, 160))
    elements = [{"ref": 1, "parent": 0, "tag": "body", "bbox": [0, 0, 1, 1], "text": "", "id": "", "classes": "",
                 "focused": False, "leaf": False, "tampered": False, "value": None}]
    for ref, (tag, text) in enumerate([("input_text", ""), ("button", "Submit"), ("button", "Cancel")], start=2):
        y, x = int(rng.integers(60, H - 30)), int(rng.integers(0, W - 60))
        draw.rectangle([x, y, x + 60, y + 20], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        elements.append(element(ref, tag, [y / H, x / W, (y + 20) / H, (x + 60) / W], text))
    return img, elements


def write_tiny_dataset(root: Path, n_traj: int = 3, steps: int = 3, seed: int = 0) -> Dataset:
    """A small dataset of real PNG screenshots with DOM elements, goals and previous-action observations."""
    writer = DatasetWriter(root, gamma=0.95, source="test")
    trajs = []
    for t in range(n_traj):
        rows, history = [], []
        for i in range(steps):
            img, elements = page(seed + 10 * t + i)
            shot, sha = writer.put_image(img)
            y0, x0, y1, x1 = elements[1 + i % 3]["bbox"]
            action = Action.tap(round((y0 + y1) / 2, 4), round((x0 + x1) / 2, 4)) if i != 1 else Action.type_text("vina")
            observation = f"Previous Actions: {' '.join(format_action(a) for a in history)} Goal: {GOAL}</s>"
            rows.append(Step(traj_id=f"t{t:03d}", step_id=i, task="synthetic", goal=GOAL, observation=observation,
                             screenshot=shot, screenshot_sha256=sha, elements=json.dumps(elements), action=action,
                             reward=float(i == steps - 1), done=i == steps - 1))
            history.append(action)
        trajs.append(Trajectory(traj_id=f"t{t:03d}", task="synthetic", goal=GOAL, steps=rows))
    writer.write_shard("part-0", trajs)
    writer.finalize()
    return Dataset(root)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "raw")


def test_candidates_are_deterministic_and_index_0_is_the_dataset_action(dataset):
    a = C.make_candidates(dataset, 16, seed=7)
    b = C.make_candidates(dataset, 16, seed=7)
    assert a.equals(b)
    assert a.schema == CANDIDATE_TABLE_SCHEMA
    assert a.num_rows == 9 * 16
    steps = {(r["traj_id"], r["step_id"]): r for r in dataset.table().to_pylist()}
    rows = a.to_pylist()
    for r in rows:
        if r["cand_idx"] == 0:
            assert r["action"] == steps[(r["traj_id"], r["step_id"])]["action"]
            assert r["draws"] >= 1
    assert not C.make_candidates(dataset, 16, seed=8).equals(a)  # the seed matters
    # each candidate carries what it does (taps: the element under the point); the first of a class its draws, repeats 0
    for key, step in steps.items():
        state = [r for r in rows if (r["traj_id"], r["step_id"]) == key]
        keys = [semantic_key(r["action"], json.loads(step["elements"])) for r in state]
        assert [r["semantic_key"] for r in state] == keys and [r["draws"] for r in state] == draw_counts(keys)
    assert sum(r["draws"] == 0 for r in rows) > 0  # π_β repeats itself


def test_draw_counts_and_taps_on_one_element_are_one_candidate():
    assert draw_counts(["a", "b", "a", "c", "a"]) == [3, 1, 0, 1, 0]
    elements = json.dumps([{"ref": 7, "tag": "button", "bbox": [0.2, 0.2, 0.4, 0.6]}])
    taps = [format_action(Action.tap(*p)) for p in [(0.3, 0.3), (0.25, 0.5), (0.9, 0.9), (0.35, 0.21)]]
    table = C.candidate_table([({"traj_id": "t0", "step_id": 0, "elements": elements}, taps)])
    assert table.column("semantic_key").to_pylist() == ["tap@7", "tap@7", "tap@none", "tap@7"]
    assert table.column("draws").to_pylist() == [3, 0, 1, 0]
    as_strings = C.candidate_table([({"traj_id": "t0", "step_id": 0}, taps)])  # no DOM: the canonical strings, all distinct
    assert as_strings.column("draws").to_pylist() == [1, 1, 1, 1]


def test_a_states_candidates_do_not_depend_on_the_other_states(dataset):
    from digiq.envs.behavior import BehaviorPolicy

    rows = dataset.table().to_pylist()
    policy = BehaviorPolicy()
    forward = [C.sample_state(policy, r, 32, 3) for r in rows]
    backward = [C.sample_state(policy, r, 32, 3) for r in reversed(rows)][::-1]
    assert forward == backward
    assert C.state_rng(3, "t000", 1).integers(1 << 30) != C.state_rng(3, "t000", 2).integers(1 << 30)


def test_gate_passes_and_fails_with_a_readable_message(dataset, tmp_path):
    table = C.make_candidates(dataset, 32, seed=0)
    summary = C.diversity(table)
    assert summary["states"] == 9 and summary["k"] == 32
    assert 2 <= summary["mean_distinct"] <= 32 and summary["frac_two_distinct"] == 1.0
    ok = C.check_diversity(table, 2.0, 0.9, docs_dir=tmp_path / "docs")
    assert ok.success and (tmp_path / "docs" / "index.html").is_file()
    params = stage_params(dataset, tmp_path, k=32, min_mean_distinct=1000.0)
    with pytest.raises(DigiqError, match=r"action_diversity failed: mean distinct actions per state ≥ 1000 \(observed"):
        run(params)
    assert not (tmp_path / "c.parquet").exists()  # nothing written past a failed gate
    assert json.loads((tmp_path / "m.json").read_text())["gate"]["success"] is False
    # k = 1: only the dataset action, one distinct action per state → the ≥ 2 floor fails
    one = C.make_candidates(dataset, 1, seed=0)
    failed = C.check_diversity(one, 1.0, 0.5)
    assert not failed.success and any("≥ 2 distinct" in f for f in failed.failures)


def stage_params(dataset: Dataset, tmp_path: Path, **candidates) -> Params:
    """Params of the candidates stage on ``dataset``, its outputs under ``tmp_path``."""
    outputs = {"out": str(tmp_path / "c.parquet"), "metrics": str(tmp_path / "m.json"), "checks": str(tmp_path / "checks")}
    return Params.model_validate({"collect": {"out": str(dataset.root)}, "candidates": {**outputs, **candidates}})


def test_stage_writes_table_and_metrics(dataset, tmp_path):
    outcome = run(stage_params(dataset, tmp_path, k=8, min_mean_distinct=1.0))
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.num_rows == 72 and table.schema.field("cand_idx").type == "int32"
    assert outcome.metrics["states"] == 9 and outcome.metrics["gate"]["success"]


def test_imported_candidates_are_kept(dataset, tmp_path):
    import shutil

    root = tmp_path / "imported"
    shutil.copytree(dataset.root, root)
    steps = Dataset(root).table().to_pylist()
    tap = format_action(Action.tap(0.5, 0.5))
    rows = [{"traj_id": r["traj_id"], "step_id": r["step_id"], "cand_idx": i, "action": a}
            for r in steps for i, a in enumerate([r["action"], tap, tap])]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), root / C.IMPORTED_FILE)
    table = C.make_candidates(Dataset(root), 64, seed=0)
    assert table.num_rows == 3 * len(steps) and table.column("action").to_pylist()[:3] == [steps[0]["action"], tap, tap]
    keys = table.column("semantic_key").to_pylist()[:3]
    assert keys == [semantic_key(a, json.loads(steps[0]["elements"])) for a in (steps[0]["action"], tap, tap)]
    assert table.column("draws").to_pylist()[:3] == draw_counts(keys) and keys[1] == keys[2]


def test_cli_candidates(dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from digiq.cli.main import app

    if "candidates" not in {c.name for c in app.registered_commands}:
        from digiq.cli import candidates as cli

        cli.register(app)
    monkeypatch.chdir(tmp_path)  # metrics/ and data/checks/ are relative to the working directory
    out = tmp_path / "c.parquet"
    result = CliRunner().invoke(app, ["candidates", "-S", f"collect.out={dataset.root}", "-S", "candidates.k=16", "--out", str(out),
                                      "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == 9 * 16
    assert (tmp_path / "metrics" / "candidates.json").is_file()


# ----------------------------------------------------------------------------- semantic de-duplication

ELEMENTS = [
    {"ref": 1, "tag": "div", "bbox": [0.0, 0.0, 1.0, 1.0], "leaf": False},
    {"ref": 2, "tag": "div", "bbox": [0.1, 0.1, 0.6, 0.9], "leaf": False},
    {"ref": 3, "tag": "button", "bbox": [0.2, 0.2, 0.3, 0.5]},
    {"ref": 4, "tag": "span", "bbox": [0.5, 0.5, 0.55, 0.6], "leaf": True},
]


def test_taps_are_the_same_candidate_when_they_hit_the_same_element():
    jittered = [Action.tap(0.21, 0.25), Action.tap(0.29, 0.45), format_action(Action.tap(0.25, 0.3))]
    assert {semantic_key(a, ELEMENTS) for a in jittered} == {"tap@3"}
    assert semantic_key(Action.tap(0.52, 0.55), ELEMENTS) == "tap@4"  # the innermost tappable element
    assert semantic_key(Action.tap(0.8, 0.8), ELEMENTS) == "tap@none"  # only non-tappable containers there
    enter = Action(action_type=ActionType.PRESS_ENTER)
    assert semantic_key(enter, ELEMENTS) == format_action(enter)
    assert semantic_key(Action.tap(0.21, 0.25), []) == format_action(Action.tap(0.21, 0.25))  # no DOM (imported data)


def test_live_candidate_sets_drop_taps_on_an_already_drawn_element():
    from digiq.evaluate import candidate_set

    class Draws:
        def sample(self, view, k, rng):
            return [Action.tap(0.21, 0.25), Action.tap(0.29, 0.45), Action(action_type=ActionType.PRESS_ENTER), Action.tap(0.52, 0.55),
                    Action(action_type=ActionType.PRESS_ENTER)][:k]

    class View:
        elements = ELEMENTS

    chosen, draws = candidate_set(Draws(), View(), 5, np.random.default_rng(0))
    assert chosen == [Action.tap(0.21, 0.25), Action(action_type=ActionType.PRESS_ENTER), Action.tap(0.52, 0.55)]
    assert draws == [2, 2, 1]  # the first two taps hit one element; ENTER was drawn twice
