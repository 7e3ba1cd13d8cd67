"""ε-labels on real PNG datasets written with DatasetWriter: the MSE, the threshold, exclusions, gate, sweep, CLI."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from digiq import labels as L
from digiq.cli.label import register
from digiq.config import LabelParams
from digiq.params_file import validate_params
from digiq.errors import DigiqError
from digiq.pipelines import label as stage
from digiq.schema import Action, Step, Trajectory
from digiq.store import Dataset, DatasetWriter

H, W = 210, 160  # a MiniWoB screen


def solid(rgb, h=8, w=8):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


def write_dataset(root: Path, trajectories: list[list[dict]]) -> Dataset:
    """A dataset from trajectories given as lists of {"s": array, "next": array|None, "action": Action, "done": bool}."""
    writer = DatasetWriter(root, gamma=0.95, source="test")
    trajs = []
    for t, steps in enumerate(trajectories):
        rows = []
        for i, step in enumerate(steps):
            shot, shot_sha = writer.put_image(step["s"])
            nxt, nxt_sha = writer.put_image(step["next"]) if step.get("next") is not None else (None, None)
            rows.append(
                Step(
                    traj_id=f"t{t:04d}", step_id=i, task="synthetic", goal="g", observation="o",
                    screenshot=shot, screenshot_sha256=shot_sha, next_screenshot=nxt, next_screenshot_sha256=nxt_sha,
                    action=step["action"], reward=float(step.get("done", False)), done=step.get("done", False),
                )
            )
        trajs.append(Trajectory(traj_id=f"t{t:04d}", task="synthetic", goal="g", steps=rows))
    writer.write_shard("part-0", trajs)
    writer.finalize()
    return Dataset(root)


def synthetic_screens(n_traj: int, steps: int, seed: int = 0) -> list[list[dict]]:
    """MiniWoB-like episodes: taps that open a panel (large change) or miss (none), typing (a few
    text pixels), Enter (none); the last step is terminal with the black frame as next screenshot."""
    rng = np.random.default_rng(seed)
    trajectories = []
    for _ in range(n_traj):
        screen = np.full((H, W, 3), 255, dtype=np.uint8)
        screen[:50] = (255, 255, 160)  # the goal banner
        for _ in range(4):  # a few widgets
            y, x = rng.integers(55, H - 30), rng.integers(0, W - 60)
            screen[y : y + 20, x : x + 60] = rng.integers(0, 255, 3)
        episode = []
        for i in range(steps):
            after = screen.copy()
            kind = rng.choice(["tap_hit", "tap_miss", "type", "enter"], p=[0.4, 0.25, 0.25, 0.1])
            if kind == "tap_hit":
                y, x = rng.integers(50, H - 60), rng.integers(0, W - 80)
                after[y : y + 60, x : x + 80] = rng.integers(0, 255, 3)
                action = Action.tap(round((y + 30) / H, 4), round((x + 40) / W, 4))
            elif kind == "tap_miss":
                action = Action.tap(0.9, 0.5)
            elif kind == "type":
                y = rng.integers(60, H - 10)
                after[y : y + 8, 10 : 10 + 6 * int(rng.integers(2, 12)) : 2] = 120  # typed characters: thin grey strokes
                action = Action.type_text("abc")
            else:
                action = Action.simple("PRESS_ENTER")
            done = i == steps - 1
            episode.append({"s": screen, "next": np.zeros_like(screen) if done else after, "action": action, "done": done})
            screen = after
        trajectories.append(episode)
    return trajectories


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Dataset:
    return write_dataset(tmp_path_factory.mktemp("synthetic"), synthetic_screens(n_traj=40, steps=5))


# --- the equation on hand-computed images ---------------------------------------------------------------


def test_mse_per_channel_hand_computed(tmp_path):
    ds = write_dataset(tmp_path, [[{"s": solid((10, 20, 30)), "next": solid((13, 16, 30)), "action": Action.simple("PRESS_ENTER")}]])
    run = L.make_labels(ds, epsilon=30, scale=1.0)
    assert run.table["mse"].tolist() == [pytest.approx((3**2 + 4**2 + 0**2) / 3)]  # 25/3 over the 3 channels


def test_box_downscale_averages_each_block(tmp_path):
    # 8x8 image: in every 4x4 block the top-left 2x2 pixels are 200, the rest 0 → each block's mean is 50.
    before = np.zeros((8, 8, 3), dtype=np.uint8)
    for by in (0, 4):
        for bx in (0, 4):
            before[by : by + 2, bx : bx + 2] = 200
    after = np.zeros_like(before)
    ds = write_dataset(tmp_path, [[{"s": before, "next": after, "action": Action.tap(0.5, 0.5)}]])
    assert L.downscale(ds.load_image(ds.steps_df()["screenshot"][0]), 0.25).tolist() == [[[50] * 3] * 2] * 2
    assert L.make_labels(ds, 30, scale=0.25).table["mse"][0] == 50.0**2  # 2x2 pixels of 50 vs 0
    assert L.make_labels(ds, 30, scale=1.0).table["mse"][0] == 200.0**2 * 16 / 64  # a quarter of the pixels differ by 200


def test_downscaled_size():
    assert L.downscaled_size(160, 210, 0.25) == (40, 52)
    assert L.downscaled_size(3, 3, 0.1) == (1, 1)


def test_threshold_boundary_is_no(tmp_path):
    ds = write_dataset(tmp_path, [[{"s": solid((0, 0, 0)), "next": solid((6, 6, 6)), "action": Action.type_text("a")}]])
    run = L.compute_mse(ds, scale=0.25)
    assert run.table["mse"][0] == 36.0
    assert L.label_table(run.table, 36.0)["label"][0] == "No"  # mse == ε is not a change
    assert L.label_table(run.table, 35.999)["label"][0] == "Yes"
    assert L.threshold(np.array([29.9, 30.0, 30.1]), 30).tolist() == ["No", "No", "Yes"]


# --- what gets labelled ---------------------------------------------------------------------------------


def test_terminal_and_missing_next_excluded(tmp_path):
    a, b = solid((255, 255, 255)), solid((0, 0, 0))
    ds = write_dataset(
        tmp_path,
        [
            [  # ends in termination: the black frame must not become a "Yes"
                {"s": a, "next": a, "action": Action.tap(0.5, 0.5)},
                {"s": a, "next": b, "action": Action.tap(0.5, 0.5), "done": True},
            ],
            [  # truncated: no next frame recorded, not terminal
                {"s": a, "next": a, "action": Action.simple("PRESS_ENTER")},
                {"s": a, "next": None, "action": Action.simple("PRESS_ENTER")},
            ],
        ],
    )
    run = L.make_labels(ds, 30, 0.25)
    assert run.table[["traj_id", "step_id"]].values.tolist() == [["t0000", 0], ["t0001", 0]]
    assert run.table["label"].tolist() == ["No", "No"]
    assert run.excluded == {"terminal": 1, "no_next_screenshot": 1} and run.total_steps == 4


def test_each_screenshot_decoded_once(synthetic):
    run = L.make_labels(synthetic, 30, 0.25)
    steps = synthetic.steps_df()
    labelled = steps[~steps["done"]]
    distinct = set(labelled["screenshot_sha256"]) | set(labelled["next_screenshot_sha256"])
    assert run.decoded == len(distinct)
    assert len(run.table) == 40 * 4


def test_output_table_and_determinism(synthetic, tmp_path):
    first = L.make_labels(synthetic, 30, 0.25).table
    L.write_labels(first, tmp_path / "labels.parquet")
    again = L.read_labels(tmp_path / "labels.parquet")
    assert list(again.columns) == list(L.LABEL_COLUMNS)
    pd.testing.assert_frame_equal(again, L.make_labels(synthetic, 30, 0.25).table)
    assert set(again["action_kind"]) == {"tap", "type", "press_enter"}
    assert (again["epsilon"] == 30).all() and (again["scale"] == 0.25).all()
    # typed text changes few pixels, a missed tap or Enter none, an opened panel many
    by_kind = again.groupby("action_kind")["mse"].median()
    assert by_kind["press_enter"] == 0 < by_kind["type"] < by_kind["tap"]


def test_size_mismatch_names_the_file(tmp_path):
    ds = write_dataset(tmp_path, [[{"s": solid((0, 0, 0), 8, 8), "next": solid((0, 0, 0), 12, 8), "action": Action.tap(0.5, 0.5)}]])
    with pytest.raises(DigiqError, match=r"next_screenshot: screenshot is 2x2 but next_screenshot is 2x3"):
        L.make_labels(ds, 30, 0.25)


def test_corrupt_screenshot_names_the_file(tmp_path):
    ds = write_dataset(tmp_path, [[{"s": solid((0, 0, 0)), "next": solid((9, 9, 9)), "action": Action.tap(0.5, 0.5)}]])
    (ds.root / ds.steps_df()["next_screenshot"][0]).write_bytes(b"not a png")
    with pytest.raises(DigiqError, match="screenshot_sha256: screenshot content does not match"):
        L.make_labels(ds, 30, 0.25)


# --- the label-balance gate -----------------------------------------------------------------------------


def labels_frame(counts: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """A label table with, per kind, (n, number of Yes)."""
    rows = []
    for kind, (n, yes) in counts.items():
        for i in range(n):
            rows.append({"traj_id": f"{kind}-{i}", "step_id": 0, "action_kind": kind, "mse": 100.0 if i < yes else 0.0})
    return L.label_table(pd.DataFrame(rows).assign(scale=0.25), 30)


def rule(**gate) -> LabelParams:
    """The gate's settings with no per-kind bands unless given."""
    return LabelParams(**{"yes_band": (0.15, 0.85), "kind_bands": {}, **gate})


def test_gate_passes_within_band(tmp_path):
    result, ungated = L.check_labels(labels_frame({"tap": (40, 20), "type": (40, 10)}), rule(), tmp_path / "docs")
    assert result.success and ungated == []
    assert (tmp_path / "docs" / "index.html").is_file()


def test_gate_fails_naming_kind_and_fraction():
    table = labels_frame({"tap": (40, 38), "type": (40, 20), "press_enter": (40, 0)})
    result, _ = L.check_labels(table, rule())
    assert result.failures == ["Yes fraction of tap in [0.15, 0.85] (observed 0.95)", "Yes fraction of press_enter in [0.15, 0.85] (observed 0)"]
    with pytest.raises(DigiqError, match=r"^data/raw: label_balance failed: Yes fraction of tap in \[0.15, 0.85\] \(observed 0.95\); "):
        result.raise_for_failures("data/raw")


def test_gate_overall_band_and_overrides():
    table = labels_frame({"tap": (40, 38), "press_enter": (40, 36)})
    result, _ = L.check_labels(table, rule(kind_bands={"tap": (0.0, 1.0), "press_enter": (0.5, 1.0)}))
    assert result.failures == ["Yes fraction overall in [0.15, 0.85] (observed 0.925)"]


def test_rare_kinds_reported_not_gated():
    table = labels_frame({"tap": (40, 20), "swipe": (5, 5)})
    result, ungated = L.check_labels(table, rule(min_count=10))
    assert result.success and ungated == ["swipe"]
    assert not any("swipe" in r["description"] for r in result.results)


def test_bad_band_refused():
    with pytest.raises(DigiqError, match=r"label.kind_bands: Value error, tap \[0.9, 0.1\] must satisfy 0 <= low <= high <= 1"):
        validate_params({"label": {"kind_bands": {"tap": [0.9, 0.1]}}})


# --- the sweep ------------------------------------------------------------------------------------------


def test_sweep_matches_thresholding(synthetic):
    mse = L.compute_mse(synthetic, 0.25).table
    table = L.sweep(mse, [30, 5, 80])
    assert table["epsilon"].tolist() == [5.0, 30.0, 80.0] and list(table.columns) == ["epsilon", "overall", "tap", "type", "press_enter"]
    labelled = L.label_table(mse, 30)
    row = table[table["epsilon"] == 30].iloc[0]
    assert row["overall"] == (labelled["label"] == "Yes").mean()
    assert row["type"] == (labelled[labelled["action_kind"] == "type"]["label"] == "Yes").mean()
    assert table["overall"].is_monotonic_decreasing


def test_bad_sweep_epsilons_refused():
    with pytest.raises(DigiqError, match=r"label.sweep_epsilons: Value error, ε values must be finite numbers >= 0"):
        validate_params({"label": {"sweep_epsilons": [5, -1]}})


# --- stage and CLI --------------------------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # a second command keeps `label` a sub-command
    return app


def label_params(dataset: Path, root: Path, **label):
    """Params labelling ``dataset`` with every output under ``root``; ``label`` overrides the section."""
    outputs = {"out": str(root / "labels.parquet"), "metrics": str(root / "metrics.json"), "checks": str(root / "checks"),
               "plots": str(root / "plots")}
    return validate_params({"collect": {"out": str(dataset)}, "label": {"epsilon": 30, "scale": 0.25, **outputs, **label}})


def test_stage_writes_outputs(synthetic, tmp_path):
    outcome = stage.run(label_params(synthetic.root, tmp_path, yes_band=[0.05, 0.95], kind_bands={"press_enter": [0.0, 0.5]}, min_count=10))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(outcome.metrics))
    assert metrics["labelled"] == 160 and metrics["excluded"] == {"terminal": 40, "no_next_screenshot": 0}
    assert set(metrics["per_kind"]) == {"tap", "type", "press_enter"} and metrics["gate"]["success"]
    assert metrics["mse"]["p50"] >= 0 and "p90" in metrics["mse"]
    assert len(L.read_labels(tmp_path / "labels.parquet")) == 160
    assert (tmp_path / "checks" / "index.html").is_file()
    assert pd.read_csv(tmp_path / "plots" / stage.SWEEP_CSV)["epsilon"].tolist() == [5, 10, 20, 30, 50, 80]


def test_stage_gate_failure_writes_no_labels(synthetic, tmp_path):
    with pytest.raises(DigiqError, match=r"label_balance failed: Yes fraction of press_enter in \[0.15, 0.85\] \(observed 0\)"):
        stage.run(label_params(synthetic.root, tmp_path, yes_band=[0.15, 0.85], kind_bands={}, min_count=5))
    assert not (tmp_path / "labels.parquet").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["gate"]["success"] is False  # the diagnosis is kept


def test_cli_sweep_and_label(synthetic, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("label:\n  epsilon: 30\n  scale: 0.25\n  yes_band: [0.0, 1.0]\n")
    runner = CliRunner()
    common = ["-S", f"collect.out={synthetic.root}", "--params", str(params), "-S", f"label.plots={tmp_path / 'plots'}"]
    swept = runner.invoke(cli(), ["label", "--sweep", "-S", "label.sweep_epsilons=[10,30,80]", *common])
    assert swept.exit_code == 0, swept.output
    assert "30*" in swept.output and "press_enter" in swept.output
    assert pd.read_csv(tmp_path / "plots" / stage.SWEEP_CSV)["epsilon"].tolist() == [10, 30, 80]
    assert not (tmp_path / "labels.parquet").exists()
    labelled = runner.invoke(
        cli(), ["label", *common, "--out", str(tmp_path / "labels.parquet"), "-S", f"label.metrics={tmp_path / 'm.json'}",
                "-S", f"label.checks={tmp_path / 'checks'}"]
    )
    assert labelled.exit_code == 0, labelled.output
    assert len(L.read_labels(tmp_path / "labels.parquet")) == 160


def test_cli_error_is_one_line(tmp_path):
    result = CliRunner().invoke(cli(), ["label", "-S", f"collect.out={tmp_path / 'missing'}", "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "not a digiq dataset" in result.output and "Traceback" not in result.output


def test_unknown_resample_and_bad_scale_refused(tmp_path):
    ds = write_dataset(tmp_path, [[{"s": solid((0, 0, 0)), "next": solid((9, 9, 9)), "action": Action.tap(0.5, 0.5)}]])
    with pytest.raises(DigiqError, match="resample: unknown resampling filter 'cubic'"):
        L.make_labels(ds, 30, 0.25, resample="cubic")
    with pytest.raises(DigiqError, match=r"scale: scale must be in \(0, 1\]"):
        L.make_labels(ds, 30, 1.5)


def test_read_labels_checks_columns(tmp_path):
    pd.DataFrame({"traj_id": ["a"], "mse": [1.0]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DigiqError, match=r"bad.parquet: step_id: missing column\(s\) step_id, action_kind"):
        L.read_labels(tmp_path / "bad.parquet")
