"""The trajectory store: write/read round trips, returns, and clear errors on damaged datasets."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digiq.errors import DigiqError
from digiq.schema import Action, ActionType, Step, Trajectory, discounted_returns
from digiq.store import MANIFEST, STEPS_DIR, Dataset, DatasetWriter, sha256_bytes


def _frame(value: int) -> np.ndarray:
    frame = np.zeros((6, 4, 3), np.uint8)
    frame[..., 0] = value
    frame[0, 0] = [value, 255 - value, 3]
    return frame


def make_trajectory(writer: DatasetWriter, traj_id: str, actions: list[Action], rewards: list[float], task: str = "click-button") -> Trajectory:
    frames = [writer.put_image(_frame((hash(traj_id) + i) % 256)) for i in range(len(actions) + 1)]
    steps = [
        Step(
            traj_id=traj_id,
            step_id=i,
            task=task,
            seed=7,
            goal=f"Click on the {task} button",
            observation=f"Previous Actions: Goal: {task}</s>",
            screenshot=frames[i][0],
            screenshot_sha256=frames[i][1],
            next_screenshot=frames[i + 1][0],
            next_screenshot_sha256=frames[i + 1][1],
            elements=json.dumps([{"ref": i, "text": "OK"}]),
            action=action,
            reward=reward,
            done=i == len(actions) - 1,
        )
        for i, (action, reward) in enumerate(zip(actions, rewards))
    ]
    return Trajectory(traj_id=traj_id, task=task, goal=steps[0].goal, steps=steps)


ACTIONS = [Action.tap(0.52, 0.31), Action.type_text("hello"), Action.simple("PRESS_ENTER")]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    writer = DatasetWriter(tmp_path / "ds", gamma=0.9, source="test")
    writer.write_shard("a", [make_trajectory(writer, "t0", ACTIONS, [0.0, 0.0, 1.0])])
    writer.write_shard("b", [make_trajectory(writer, "t1", ACTIONS[:2], [0.0, 0.0], task="enter-text")])
    writer.finalize()
    return tmp_path / "ds"


def test_write_read_round_trip(dataset: Path):
    ds = Dataset(dataset)
    assert ds.manifest["n_trajectories"] == 2 and ds.manifest["n_steps"] == 5 and ds.gamma == 0.9
    t0 = ds.trajectory("t0")
    assert [s.action for s in t0.steps] == ACTIONS
    assert [s.reward for s in t0.steps] == [0.0, 0.0, 1.0] and t0.success
    assert t0.steps[0].elements == json.dumps([{"ref": 0, "text": "OK"}]) and t0.steps[0].seed == 7
    image = ds.load_image(t0.steps[1].screenshot, t0.steps[1].screenshot_sha256)
    assert image.size == (4, 6)
    assert [t.traj_id for t in ds.iter_trajectories()] == ["t0", "t1"]
    assert ds.query("SELECT count(*) AS n FROM steps WHERE action_kind = 'tap'")["n"][0] == 2


def test_returns_use_gamma_computed_by_hand(dataset: Path):
    # γ = 0.9, rewards 0, 0, 1:  G2 = 1,  G1 = 0 + 0.9 · 1 = 0.9,  G0 = 0 + 0.9 · 0.9 = 0.81
    returns = [s.mc_return for s in Dataset(dataset).trajectory("t0").steps]
    assert returns == pytest.approx([0.81, 0.9, 1.0], abs=1e-12)
    assert discounted_returns([1.0, 0.0, 1.0], 0.5) == [1.25, 0.5, 1.0]  # 1 + 0.5 · (0 + 0.5 · 1)


def test_identical_frames_are_stored_once(tmp_path: Path):
    writer = DatasetWriter(tmp_path / "ds", gamma=0.95, source="test")
    first, second = writer.put_image(_frame(5)), writer.put_image(_frame(5))
    assert first == second and len(list((tmp_path / "ds" / "screenshots").rglob("*.png"))) == 1
    assert writer.put_image((tmp_path / "ds" / first[0]).read_bytes()) == first


def test_shards_are_not_rewritten(dataset: Path):
    writer = DatasetWriter(dataset, gamma=0.9, source="test")
    assert writer.has_shard("a") and not writer.has_shard("c")


def test_corrupt_parquet_shard_names_the_file(dataset: Path):
    shard = dataset / STEPS_DIR / "b.parquet"
    shard.write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(DigiqError, match=r"b\.parquet: truncated or not a Parquet file") as caught:
        Dataset(dataset).table()
    assert "\n" not in str(caught.value)


def test_truncated_parquet_shard_names_the_file(dataset: Path):
    shard = dataset / STEPS_DIR / "a.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DigiqError, match=r"a\.parquet: truncated or not a Parquet file"):
        Dataset(dataset).trajectory_ids()


def test_shard_missing_a_column_names_it(dataset: Path):
    import pyarrow.parquet as pq

    shard = dataset / STEPS_DIR / "a.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["reward"]), shard)
    with pytest.raises(DigiqError, match=r"a\.parquet: reward: missing column"):
        Dataset(dataset).table()


def test_missing_manifest(dataset: Path):
    (dataset / MANIFEST).unlink()
    with pytest.raises(DigiqError, match="no manifest.json"):
        Dataset(dataset)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "invalid JSON"), ("[1, 2]", "expected a JSON object"), ('{"schema_version": 99}', "schema_version 99")],
)
def test_bad_manifest(dataset: Path, content: str, expected: str):
    (dataset / MANIFEST).write_text(content)
    with pytest.raises(DigiqError, match=expected):
        Dataset(dataset)


def test_missing_png(dataset: Path):
    ds = Dataset(dataset)
    step = ds.trajectory("t1").steps[0]
    (dataset / step.screenshot).unlink()
    with pytest.raises(DigiqError, match="screenshot file is missing"):
        ds.load_image(step.screenshot, step.screenshot_sha256)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png(dataset: Path, damage: str):
    ds = Dataset(dataset)
    step = ds.trajectory("t1").steps[0]
    path = dataset / step.screenshot
    data = path.read_bytes()
    path.write_bytes(b"definitely not a png" if damage == "garbage" else data[: len(data) - 20])
    with pytest.raises(DigiqError, match="not a readable PNG") as caught:
        ds.load_image(step.screenshot)  # no hash given: the decoder must notice
    assert str(path) in str(caught.value)


def test_png_sha_mismatch(dataset: Path):
    ds = Dataset(dataset)
    step = ds.trajectory("t0").steps[0]
    other = ds.trajectory("t0").steps[1]
    shutil.copy(dataset / other.screenshot, dataset / step.screenshot)  # a valid PNG, but not this one
    with pytest.raises(DigiqError, match="does not match its sha256"):
        ds.load_image(step.screenshot, step.screenshot_sha256)


def test_extra_tables_are_duckdb_views(dataset: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"traj_id": ["t0"], "step_id": [0], "cand_idx": [0]}), dataset / "candidates.parquet")
    pq.write_table(pa.table({"x": [1]}), dataset / "odd-name.parquet")
    con = Dataset(dataset).connect()
    assert con.execute("SELECT count(*) FROM candidates JOIN steps USING (traj_id, step_id)").fetchone()[0] == 1
    assert con.execute('SELECT x FROM "odd-name"').fetchone()[0] == 1


def test_unknown_trajectory(dataset: Path):
    with pytest.raises(DigiqError, match="no trajectory 'nope'"):
        Dataset(dataset).trajectory("nope")


def test_bad_gamma():
    with pytest.raises(DigiqError, match="gamma must be in"):
        DatasetWriter(tempfile.gettempdir(), gamma=1.5, source="test")


# --------------------------------------------------------------------------- property


POINT = st.tuples(st.floats(0, 1), st.floats(0, 1))
GENERATED_ACTION = st.one_of(
    st.builds(Action.tap, st.floats(0, 1), st.floats(0, 1)),
    st.builds(Action.swipe, POINT, POINT),
    st.builds(Action.type_text, st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)),
    st.sampled_from([Action.simple(t) for t in ActionType if t not in (ActionType.DUAL_POINT, ActionType.TYPE)]),
)


@st.composite
def generated_trajectories(draw: st.DrawFn) -> list[tuple[str, list[Action], list[float]]]:
    count = draw(st.integers(1, 4))
    return [
        (f"traj-{i}", actions, draw(st.lists(st.sampled_from([0.0, 1.0, 0.5, -1.0]), min_size=len(actions), max_size=len(actions))))
        for i in range(count)
        for actions in [draw(st.lists(GENERATED_ACTION, min_size=1, max_size=5))]
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated_trajectories(), st.floats(0, 1), st.integers(1, 3))
def test_generated_trajectories_round_trip(spec, gamma, per_shard):
    with tempfile.TemporaryDirectory() as tmp:
        writer = DatasetWriter(Path(tmp) / "ds", gamma=gamma, source="hypothesis")
        written = [make_trajectory(writer, traj_id, actions, rewards) for traj_id, actions, rewards in spec]
        for i in range(0, len(written), per_shard):
            writer.write_shard(f"part-{i:03d}", written[i : i + per_shard])
        writer.finalize()
        ds = Dataset(Path(tmp) / "ds")
        read = list(ds.iter_trajectories())
        assert [t.traj_id for t in read] == [t.traj_id for t in written]
        for got, expected in zip(read, written):
            returns = discounted_returns([s.reward for s in expected.steps], gamma)
            for g, e, ret in zip(got.steps, expected.steps, returns):
                assert g.model_dump(exclude={"mc_return"}) == e.model_dump(exclude={"mc_return"})
                assert g.mc_return == pytest.approx(ret, abs=1e-12)
                assert sha256_bytes((ds.root / g.screenshot).read_bytes()) == g.screenshot_sha256
