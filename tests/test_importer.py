"""The importer of official Digi-Q / DigiRL files: round trips, error messages, atomic output, safe loading."""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digiq.errors import DigiqError
from digiq.importer import ImportOptions, import_official
from digiq.official_load import load_official
from digiq.official_writer import CANDIDATES_FILE, OFFICIAL_FILE, PRECOMPUTED_FILE
from digiq.schema import discounted_returns
from digiq.store import Dataset
from fixtures_official import (
    RECORDED_ROOT,
    autoui_prompt,
    make_screenshots,
    official_trajectories,
    save_official,
    write_hostile,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_screenshots(tmp_path_factory.mktemp("images"), 120)


@pytest.fixture
def images(shots: list[Path]) -> Path:
    return shots[0].parent


def _tensor_to_numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_name(recorded: str) -> str:
    return recorded.replace("\\", "/").rsplit("/", 1)[-1]


def assert_round_trip(source: list[list[dict[str, Any]]], out: Path, images: Path, gamma: float = 0.95) -> None:
    """Every value of the source file is found again in the imported dataset."""
    ds = Dataset(out)
    trajectories = list(ds.iter_trajectories())
    assert len(trajectories) == len(source)
    official = pq.read_table(out / OFFICIAL_FILE).to_pylist()
    precomputed = pq.read_table(out / PRECOMPUTED_FILE).to_pylist() if (out / PRECOMPUTED_FILE).exists() else None
    candidates = pq.read_table(out / CANDIDATES_FILE).to_pylist() if (out / CANDIDATES_FILE).exists() else None
    row = 0
    for traj, raw in zip(trajectories, source):
        assert len(traj.steps) == len(raw)
        returns = discounted_returns([float(d["reward"]) for d in raw], gamma)
        for step, d, expected_return in zip(traj.steps, raw, returns):
            assert str(step.action) == d["action"]  # the official string, byte for byte
            assert step.task == step.goal == d["task"]
            assert step.observation == d["observation"]
            assert step.reward == float(d["reward"]) and step.done == bool(d["done"])
            assert math.isclose(step.mc_return, expected_return, rel_tol=0, abs_tol=1e-12)
            assert step.screenshot_sha256 == _sha(images / _file_name(d["image_path"]))
            assert (ds.root / step.screenshot).read_bytes() == (images / _file_name(d["image_path"])).read_bytes()
            assert step.next_screenshot_sha256 == _sha(images / _file_name(d["next_image_path"]))
            ds.load_image(step.screenshot, step.screenshot_sha256)
            source_row = official[row]
            assert (source_row["traj_id"], source_row["step_id"]) == (traj.traj_id, step.step_id)
            assert source_row["next_observation"] == d["next_observation"]
            assert source_row["image_path"] == d["image_path"] and source_row["next_image_path"] == d["next_image_path"]
            assert source_row["source_mc_return"] == float(d["mc_return"])
            assert source_row["trajectory_reward"] == float(d["trajectory_reward"])
            if precomputed is not None:
                assert (precomputed[row]["traj_id"], precomputed[row]["step_id"]) == (traj.traj_id, step.step_id)
                for name in ("image_features", "next_image_features", "q_rep_out"):
                    if d.get(name) is not None:
                        np.testing.assert_array_equal(np.array(precomputed[row][name], np.float32), _tensor_to_numpy(d[name]))
            if candidates is not None:
                mine = [c for c in candidates if (c["traj_id"], c["step_id"]) == (traj.traj_id, step.step_id)]
                assert [c["cand_idx"] for c in mine] == list(range(len(mine)))
                assert [c["action"] for c in mine] == d["action_list"].split("<split>")
                assert mine[0]["action"] == d["action"]
                if "q_rep_out_list" in d:
                    np.testing.assert_array_equal(np.array([c["q_rep_out"] for c in mine], np.float32), d["q_rep_out_list"])
            row += 1
    assert row == len(official)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("numpy1_names", [False, True], ids=["numpy2-globals", "numpy1-globals"])
def test_round_trip_digiq_file_with_candidates_and_representations(tmp_path, shots, images, numpy1_names):
    source = official_trajectories(shots, 6, arrays="numpy", candidates=8, rep_dim=16, image_dim=1408)
    path = save_official(source, tmp_path / "digiq.pt", numpy1_names=numpy1_names)
    report = import_official(path, images, tmp_path / "out")
    assert report.trajectories == 6 and report.steps == sum(map(len, source)) and not report.skipped
    assert report.candidate_rows == 8 * report.steps and report.precomputed_rows == report.steps
    assert report.layout == {"image_features": 1408, "next_image_features": 1408, "q_rep_out": 16, "q_rep_out_list": 16}
    assert report.mc_return_max_abs_diff is not None and report.mc_return_max_abs_diff < 1e-12
    assert_round_trip(source, tmp_path / "out", images)
    manifest = Dataset(tmp_path / "out").manifest
    assert manifest["candidates_per_step"] == 8 and manifest["source_file"] == "digiq.pt"
    assert manifest["source_sha256"] == _sha(path)
    con = Dataset(tmp_path / "out").connect()  # the extra tables are DuckDB views beside `steps`
    assert con.execute("SELECT count(*) FROM candidates JOIN steps USING (traj_id, step_id)").fetchone()[0] == report.candidate_rows


def test_round_trip_digirl_file_with_torch_tensors_and_no_candidates(tmp_path, shots, images):
    source = official_trajectories(shots, 5, arrays="torch", image_dim=2816, seed=3)  # frame-stacked features
    path = save_official(source, tmp_path / "digirl.pt")
    report = import_official(path, images, tmp_path / "out", ImportOptions(gamma=0.95))
    assert report.candidate_rows == 0 and not (tmp_path / "out" / CANDIDATES_FILE).exists()
    assert pq.read_schema(tmp_path / "out" / PRECOMPUTED_FILE).names == ["traj_id", "step_id", "image_features", "next_image_features"]
    assert_round_trip(source, tmp_path / "out", images)


def test_round_trip_without_arrays_or_ids_uses_positions(tmp_path, shots, images):
    source = official_trajectories(shots, 4, arrays=None, ids=False, seed=5)
    path = save_official(source, tmp_path / "plain.pt")
    report = import_official(path, images, tmp_path / "out", ImportOptions(gamma=0.5))
    assert report.precomputed_rows == 0 and not (tmp_path / "out" / PRECOMPUTED_FILE).exists()
    assert Dataset(tmp_path / "out").trajectory_ids() == ["000000", "000001", "000002", "000003"]
    assert report.mc_return_max_abs_diff > 0.01  # the file's returns used γ = 0.95, ours 0.5: reported, not hidden
    assert_round_trip(source, tmp_path / "out", images, gamma=0.5)


def test_bfloat16_tensors_are_widened_to_float32(tmp_path, shots, images):
    source = official_trajectories(shots, 2, arrays="torch", image_dim=12, seed=7)
    for traj in source:
        for step in traj:
            step["image_features"] = step["image_features"].to(torch.bfloat16)
            step["next_image_features"] = step["next_image_features"].to(torch.bfloat16)
    import_official(save_official(source, tmp_path / "bf16.pt"), images, tmp_path / "out")
    stored = pq.read_table(tmp_path / "out" / PRECOMPUTED_FILE).column("image_features").to_pylist()
    np.testing.assert_array_equal(np.array(stored[0], np.float32), source[0][0]["image_features"].float().numpy())


# --------------------------------------------------------------------------- bad input


def _set(field: str, value: Any):
    def mutate(traj: list[dict[str, Any]], images: Path) -> None:
        traj[2][field] = value

    return mutate


def _delete(field: str):
    def mutate(traj: list[dict[str, Any]], images: Path) -> None:
        del traj[2][field]

    return mutate


def _corrupt_screenshot(traj: list[dict[str, Any]], images: Path) -> None:
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    traj[2]["image_path"] = f"{RECORDED_ROOT}/broken.png"


def _break_candidate(traj: list[dict[str, Any]], images: Path) -> None:
    parts = traj[2]["action_list"].split("<split>")
    parts[3] = 'Action Plan: [TAP] ; Action Decision: "action_type": "TAP"'
    traj[2]["action_list"] = "<split>".join(parts)


def _swap_candidate_zero(traj: list[dict[str, Any]], images: Path) -> None:
    parts = traj[2]["action_list"].split("<split>")
    other = next(p for p in parts[1:] if p.split("Decision: ")[1] != parts[0].split("Decision: ")[1])
    traj[2]["action_list"] = "<split>".join([other] + parts[1:])


def _other_width_everywhere(traj: list[dict[str, Any]], images: Path) -> None:
    for step in traj:
        step["image_features"] = np.zeros(1000, np.float32)
        step["next_image_features"] = np.zeros(1000, np.float32)


BAD_CASES = {
    "missing screenshot": (_set("image_path", f"{RECORDED_ROOT}/gone.png"), "image_path", "'gone.png'"),
    "unreadable screenshot": (_corrupt_screenshot, "image_path", "not a readable image"),
    "missing key": (_delete("reward"), "reward", "missing key"),
    "wrong shape": (_set("image_features", np.zeros((1, 1408), np.float32)), "image_features", "expected a vector"),
    "wrong width in one step": (_set("next_image_features", np.zeros(100, np.float32)), "next_image_features", "shape [100] differs from [1408]"),
    "wrong width in a whole trajectory": (_other_width_everywhere, "image_features", "image_features [1000], next_image_features [1000]"),
    "non-finite features": (_set("q_rep_out", np.full(16, np.nan, np.float32)), "q_rep_out", "NaN"),
    "non-0/1 reward": (_set("reward", 0.5), "reward", "expected 0 or 1, got 0.5"),
    "reward of wrong type": (_set("reward", "1"), "reward", "expected a number"),
    "step ids out of order": (_set("step_id", 5), "step_id", "out of order"),
    "malformed action": (_set("action", 'Action Decision: "action_type": "CLICK"'), "action", "no Action Plan"),
    "unknown action type": (
        _set("action", '"action_type": "CLICK", "touch_point": "[0.1, 0.2]", "lift_point": "[0.1, 0.2]", "typed_text": ""'),
        "action",
        '"CLICK"',
    ),
    "malformed candidate": (_break_candidate, "action_list[3]", "TAP"),
    "candidate 0 is not the dataset action": (_swap_candidate_zero, "action_list[0]", "not the dataset action"),
    "q_rep_out_list rows": (_set("q_rep_out_list", np.zeros((7, 16), np.float32)), "q_rep_out_list", "[8, D]"),
    "done before the end": (_set("done", True), "done", "goes on"),
    "task changes": (_set("task", "Another goal"), "task", "differs from step 0"),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_input_names_trajectory_step_and_field_and_writes_nothing(tmp_path, shots, case):
    images = tmp_path / "images"
    images.mkdir()
    for shot in shots[:40]:
        (images / shot.name).write_bytes(shot.read_bytes())
    source = official_trajectories(shots[:40], 3, lengths=[3, 4, 3], arrays="numpy", image_dim=1408, candidates=8, rep_dim=16)
    mutate, field, detail = BAD_CASES[case]
    mutate(source[1], images)
    path = save_official(source, tmp_path / "bad.pt")
    out = tmp_path / "data" / "out"
    (tmp_path / "data").mkdir()
    with pytest.raises(DigiqError) as caught:
        import_official(path, images, out)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: trajectory 1, ")
    expected_step = "" if case == "wrong width in a whole trajectory" else "step 2, "
    assert f"trajectory 1, {expected_step}" in message and field in message and detail in message, message
    assert not out.exists() and list((tmp_path / "data").iterdir()) == []  # no output, no temp folder left


def test_skip_bad_skips_and_counts(tmp_path, shots, images):
    source = official_trajectories(shots, 6, arrays="numpy", image_dim=8, seed=11)
    source[1][0]["reward"] = 2
    source[4][-1]["image_path"] = "/elsewhere/missing.png"
    path = save_official(source, tmp_path / "mixed.pt")
    report = import_official(path, images, tmp_path / "out", ImportOptions(skip_bad=True))
    assert report.trajectories == 4 and len(report.skipped) == 2
    assert "trajectory 1, step 0, reward" in report.skipped[0] and "trajectory 4, step" in report.skipped[1]
    ds = Dataset(tmp_path / "out")
    assert ds.trajectory_ids() == ["000000", "000002", "000003", "000005"]
    assert ds.manifest["skipped_trajectories"] == 2
    assert_round_trip([source[i] for i in (0, 2, 3, 5)], tmp_path / "out", images)
    screenshots = {p.name for p in (tmp_path / "out" / "screenshots").rglob("*.png")}
    assert len(screenshots) == report.images  # skipped trajectories left no screenshots behind


def test_skip_bad_with_nothing_good_fails_and_writes_nothing(tmp_path, shots, images):
    source = official_trajectories(shots, 2, arrays=None, seed=2)
    for traj in source:
        traj[0]["reward"] = -1
    with pytest.raises(DigiqError, match="no valid trajectory"):
        import_official(save_official(source, tmp_path / "bad.pt"), images, tmp_path / "out", ImportOptions(skip_bad=True))
    assert not (tmp_path / "out").exists()


def test_duplicate_traj_ids_are_refused(tmp_path, shots, images):
    source = official_trajectories(shots, 3, arrays=None, seed=4)
    for step in source[2]:
        step["traj_id"] = 0
    with pytest.raises(DigiqError, match=r"trajectory 2 \(traj_id 0\), step 0, traj_id: '000000' is used by an earlier"):
        import_official(save_official(source, tmp_path / "dup.pt"), images, tmp_path / "out")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"trajectories": []}, "expected a list of trajectories"),
        ([], "holds no trajectories"),
        ([{"observation": "x"}], "trajectory 0, trajectory: expected a list of step dicts"),
        ([[]], "trajectory 0, trajectory: has no steps"),
        ([["step"]], "trajectory 0, step 0, step: expected a dict"),
    ],
)
def test_bad_file_structure(tmp_path, images, content, expected):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(DigiqError, match=expected):
        import_official(path, images, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_torch_file(tmp_path, images):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a pickle at all")
    with pytest.raises(DigiqError, match="garbage.pt") as caught:
        import_official(path, images, tmp_path / "out")
    assert "\n" not in str(caught.value)


def test_existing_output_needs_overwrite(tmp_path, shots, images):
    path = save_official(official_trajectories(shots, 2, arrays=None, seed=8), tmp_path / "a.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DigiqError, match="--overwrite"):
        import_official(path, images, out)
    assert (out / "keep.txt").read_text() == "mine"
    import_official(path, images, out, ImportOptions(overwrite=True))
    assert not (out / "keep.txt").exists() and Dataset(out).manifest["n_trajectories"] == 2


def test_missing_images_folder(tmp_path, shots):
    path = save_official(official_trajectories(shots, 1, arrays=None), tmp_path / "a.pt")
    with pytest.raises(DigiqError, match="images folder not found"):
        import_official(path, tmp_path / "nope", tmp_path / "out")


def test_windows_and_placeholder_paths_resolve_by_file_name(tmp_path, shots, images):
    source = official_trajectories(shots, 2, arrays=None, seed=9)
    source[0][0]["image_path"] = "C:\\Users\\someone\\images\\" + Path(source[0][0]["image_path"]).name
    source[1][0]["image_path"] = "<path_to_images>/" + Path(source[1][0]["image_path"]).name
    import_official(save_official(source, tmp_path / "a.pt"), images, tmp_path / "out")
    assert_round_trip(source, tmp_path / "out", images)


# --------------------------------------------------------------------------- hostile files


HOSTILE = {
    "os.system": "posix.system",
    "builtins.exec": "builtins.exec",
    "raw-pickle": "builtins.exec",
    "protocol-4": "opcode",
    "hidden-in-step": "posix.system",
}


@pytest.mark.parametrize("how", list(HOSTILE))
def test_file_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path, images, how):
    marker = tmp_path / "pwned"
    path = write_hostile(tmp_path / "hostile.pt", marker, how)
    with pytest.raises(DigiqError) as caught:
        import_official(path, images, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{path}: pickle: refused: ") and HOSTILE[how] in message
    assert "nothing from the file was executed" in message
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_the_hostile_payloads_are_live(tmp_path, how):
    """Control: the same files do run their code under the official loader (weights_only=False)."""
    marker = tmp_path / "ran"
    path = write_hostile(tmp_path / "hostile.pt", marker, how)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_other_globals_are_refused_by_name(tmp_path, images):
    import datetime

    path = tmp_path / "dates.pt"
    torch.save([[{"observation": datetime.datetime(2024, 6, 1)}]], path)
    with pytest.raises(DigiqError, match=r"unpickling needs datetime\.datetime, which is not on the allow-list"):
        load_official(path)


def test_allow_list_does_not_leak_into_later_loads(tmp_path):
    path = tmp_path / "arrays.pt"
    torch.save([np.zeros(3, np.float32)], path)
    assert load_official(path)[0].dtype == np.float32
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # numpy stays refused outside the importer


# --------------------------------------------------------------------------- property: generated files round-trip

COORD = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@st.composite
def official_action(draw: st.DrawFn) -> str:
    action_type = draw(st.sampled_from(["DUAL_POINT", "TYPE", "PRESS_BACK", "PRESS_HOME", "PRESS_ENTER", "STATUS_TASK_COMPLETE"]))
    if action_type == "DUAL_POINT":
        y, x, ly, lx = (draw(COORD) for _ in range(4))
        points = f'"touch_point": "[{y:.4f}, {x:.4f}]", "lift_point": "[{ly:.4f}, {lx:.4f}]"'
    else:
        points = '"touch_point": "[-1.0, -1.0]", "lift_point": "[-1.0, -1.0]"'
    typed = draw(TEXT) if action_type == "TYPE" else ""
    plan = ",".join(draw(st.lists(st.sampled_from(["DUAL_POINT", "TYPE", "PRESS_ENTER"]), min_size=1, max_size=4)))
    return f'Action Plan: [{plan}] ; Action Decision: "action_type": "{action_type}", {points}, "typed_text": "{typed}"'


@st.composite
def official_file(draw: st.DrawFn) -> tuple[list[list[dict[str, Any]]], float]:
    """Generated official-format trajectories (screenshots named s<i>.png) and a γ."""
    arrays = draw(st.sampled_from(["numpy", "torch", None]))
    width = draw(st.integers(1, 6))
    n_candidates = draw(st.sampled_from([0, 1, 3]))
    gamma = draw(st.floats(0.0, 1.0))
    trajectories, shot = [], 0
    for t in range(draw(st.integers(1, 3))):
        task = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30))
        length = draw(st.integers(1, 4))
        trajectory, previous = [], None
        for s in range(length):
            action = draw(official_action())
            decision = action.split("Action Decision: ", 1)[1]
            step: dict[str, Any] = {
                "observation": autoui_prompt(task, previous),
                "next_observation": autoui_prompt(task, decision),
                "task": task,
                "image_path": f"{RECORDED_ROOT}/s{shot + s}.png",
                "next_image_path": f"{RECORDED_ROOT}/s{shot + s + 1}.png",
                "action": action,
                "reward": draw(st.sampled_from([0, 1, 0.0, 1.0, np.float64(1.0), np.int64(0), True])),
                "done": s == length - 1 and draw(st.booleans()),
                "trajectory_reward": 0.0,
                "mc_return": np.float64(0.0),
                "traj_id": t,
                "step_id": s,
            }
            if arrays:
                for name in ("image_features", "next_image_features"):
                    values = np.array(draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=width, max_size=width)), np.float32)
                    step[name] = torch.from_numpy(values) if arrays == "torch" else values
            if n_candidates:
                step["action_list"] = "<split>".join([action] + [draw(official_action()) for _ in range(n_candidates - 1)])
            trajectory.append(step)
            previous = decision
        returns = discounted_returns([float(d["reward"]) for d in trajectory], 0.95)
        for d, g in zip(trajectory, returns):
            d["mc_return"], d["trajectory_reward"] = np.float64(g), float(sum(float(x["reward"]) for x in trajectory))
        trajectories.append(trajectory)
        shot += length + 1
    return trajectories, gamma


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(official_file())
def test_generated_official_files_import_and_round_trip(generated):
    source, gamma = generated
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_shots = sum(len(t) + 1 for t in source)
        for i, shot in enumerate(make_screenshots(root / "raw", n_shots, size=(4, 3), seed=1)):
            shot.rename(root / "raw" / f"s{i}.png")
        path = save_official(source, root / "gen.pt")
        import_official(path, root / "raw", root / "out", ImportOptions(gamma=gamma))
        assert_round_trip(source, root / "out", root / "raw", gamma=gamma)


def test_numpy_and_torch_traj_ids(tmp_path, shots, images):
    source = official_trajectories(shots, 2, arrays=None, seed=12)
    for step in source[0]:
        step["traj_id"] = np.int64(17)
    for step in source[1]:
        step["traj_id"] = torch.tensor(4)
    import_official(save_official(source, tmp_path / "ids.pt"), images, tmp_path / "out")
    assert Dataset(tmp_path / "out").trajectory_ids() == ["000004", "000017"]


def test_jpeg_screenshots_are_stored_as_png(tmp_path, shots):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    source = official_trajectories(shots, 1, lengths=[2], arrays=None, seed=13)
    for step in source[0]:
        for key in ("image_path", "next_image_path"):
            name = _file_name(step[key])
            Image.open(shots[0].parent / name).convert("RGB").save(images / name.replace(".png", ".jpg"), format="JPEG")
            step[key] = step[key].replace(".png", ".jpg")
    import_official(save_official(source, tmp_path / "jpeg.pt"), images, tmp_path / "out")
    ds = Dataset(tmp_path / "out")
    step = ds.trajectory("000000").steps[0]
    assert (ds.root / step.screenshot).read_bytes().startswith(b"\x89PNG")
    assert ds.load_image(step.screenshot, step.screenshot_sha256).size == Image.open(images / _file_name(source[0][0]["image_path"])).size


def test_ambiguous_screenshot_names_are_refused(tmp_path, shots):
    images = tmp_path / "images"
    for sub in ("a", "b"):
        (images / sub).mkdir(parents=True)
        for shot in shots[:10]:
            (images / sub / shot.name).write_bytes(shot.read_bytes())
    source = official_trajectories(shots[:10], 1, lengths=[2], arrays=None, seed=14)
    with pytest.raises(DigiqError, match="trajectory 0, step 0, image_path: screenshot name .* is ambiguous"):
        import_official(save_official(source, tmp_path / "amb.pt"), images, tmp_path / "out")
