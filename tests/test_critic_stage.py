"""`digiq critic` end to end: real Feast (DuckDB offline / SQLite online) on synthetic sources, real training.

One synthetic project (write_synthetic_sources + materialize, d = 16, K = 8) per module; the critic
runs through the CLI with a few updates set in the project's params.yaml.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from digiq.cli import critic as critic_cli
from digiq.critic import DoubleCritic
from digiq.errors import DigiqError
from digiq.pipelines import critic as stage
from digiq.pipelines import features as fx
from digiq.viewer.tables import load_candidate_scores, load_step_scores

ROOT = Path(__file__).resolve().parents[1]
N_STATES, K, DIM = 60, 8, 16
PARAMS = """\
seed: 2
critic:
  updates: 60
  hidden: [32]
  batch_size: 32
  log_every: 20
  device: cpu
"""


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a group, so `critic` is a sub-command as in `digiq critic`
        """test app"""

    critic_cli.register(app)
    return app


def make_project(root: Path, *, materialized: bool = True) -> Path:
    """features/ copied from the repo, synthetic data/, params.yaml; the store materialized unless told otherwise."""
    shutil.copytree(ROOT / "features", root / "features", ignore=shutil.ignore_patterns("data", "__pycache__"))
    paths = fx.write_synthetic_sources(root / "data", n_states=N_STATES, k=K, dim=DIM, seed=1)
    (root / "params.yaml").write_text(PARAMS)
    if materialized:
        inputs = fx.Inputs(repo=(root / "features").resolve(), variant="finetuned", states=paths["states"].resolve(),
                           candidates=paths["candidates"].resolve(), labels=paths["labels"].resolve(), dataset=paths["dataset"].resolve())
        fx.materialize(inputs, progress=False)
    return root


def run_critic(project: Path, name: str, *extra: str):
    args = ["critic", "--repo", str(project / "features"), "--out", str(project / name / "critic"),
            "--metrics", str(project / name / "critic.json"), "--live", str(project / name / "dvclive"),
            "--params", str(project / "params.yaml"), *extra]
    return CliRunner().invoke(_app(), args)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("critic_project"))


@pytest.fixture(scope="module")
def td_run(project) -> Path:
    result = run_critic(project, "td")
    assert result.exit_code == 0, result.output
    assert "action sensitivity" in result.output
    return project / "td"


@pytest.fixture(scope="module")
def frame(project):
    return stage.load_stage_data(project / "features", "finetuned")


def _without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "timings_s"}


# ----------------------------------------------------------------------------- outputs

def test_critic_writes_weights_scores_metrics_and_curves(td_run, frame):
    assert {p.name for p in (td_run / "critic").iterdir()} == {"model.safetensors", "config.json", stage.STEP_SCORES, stage.CANDIDATE_SCORES}
    critic = DoubleCritic.from_pretrained(td_run / "critic")
    assert (critic.d_s, critic.d_sa) == (DIM, DIM) and critic.config.updates == 60 and critic.config.seed == 2

    metrics = json.loads((td_run / "critic.json").read_text())
    assert metrics["target"] == "td" and metrics["variant"] == "finetuned" and metrics["diagnostics_on"] == "val"
    rows = metrics["rows"]
    assert rows["total"] == N_STATES == rows["train"] + rows["val"] + rows["truncated"]
    assert rows["truncated"] == int(frame.truncated.sum()) > 0  # synthetic data has cut-off episodes
    assert rows["val"] > 0 and metrics["trajectories"]["val"] >= 1
    # headline diagnostics are the held-out ones (seed 2 holds out successful trajectories on this data)
    for name in ("action_sensitivity", "ranking_quality", "v_return_corr"):
        assert isinstance(metrics[name], float) and np.isfinite(metrics[name]), name
        assert metrics[name] == metrics["diagnostics"]["val"][name]
    assert metrics["action_sensitivity"] > 0 and 0.0 <= metrics["ranking_quality"] <= 1.0
    assert metrics["diagnostics"]["val"]["ranking_states"] > 0
    assert set(metrics["val"]) == {"q_loss", "v_loss"} and set(metrics["train"]) >= {"q_loss", "v_loss", "td_error", "q_mean"}

    # DVCLive curves: one point per log_every updates, x = update count
    with open(td_run / "dvclive" / "plots" / "metrics" / "train" / "q_loss.tsv") as f:
        points = list(csv.DictReader(f, delimiter="\t"))
    assert [int(p["step"]) for p in points] == [20, 40, 60]
    for curve in ("train/v_loss", "train/td_error", "train/q_mean", "val/q_loss", "val/v_loss"):
        assert (td_run / "dvclive" / "plots" / "metrics" / f"{curve}.tsv").is_file(), curve


def test_step_and_candidate_scores_follow_the_viewer_contract(td_run, frame):
    scores = load_step_scores(td_run / "critic" / stage.STEP_SCORES)  # the viewer's own checks: finite, unique keys
    keys = {(t, int(s)) for t, s, cut in zip(frame.traj_id, frame.step_id, frame.truncated) if not cut}
    assert set(scores) == keys  # every non-truncated step, no truncated one (no TD target there)
    table = pq.read_table(td_run / "critic" / stage.STEP_SCORES).to_pandas()
    np.testing.assert_allclose(table["advantage"], table["q"] - table["v"], rtol=1e-6, atol=1e-6)
    # on terminal steps the TD target is the reward alone: td_error = r − Q(s, a_data)
    done = {(t, int(s)): r for t, s, d, r in zip(frame.traj_id, frame.step_id, frame.frame.done, frame.frame.reward) if d}
    terminal = table[[(t, s) in done for t, s in zip(table["traj_id"], table["step_id"])]]
    assert len(terminal) == len(done) > 0
    np.testing.assert_allclose(terminal["td_error"], [done[(t, s)] for t, s in zip(terminal["traj_id"], terminal["step_id"])] - terminal["q"],
                               rtol=1e-5, atol=1e-6)

    rankings = load_candidate_scores(td_run / "critic" / stage.CANDIDATE_SCORES, top_k=3)
    assert len(rankings) == N_STATES and all(r.total == K for r in rankings.values())
    cands = pq.read_table(td_run / "critic" / stage.CANDIDATE_SCORES).to_pandas()
    first = cands[cands["cand_idx"] == 0].set_index(["traj_id", "step_id"])["q"]
    np.testing.assert_allclose(first.loc[list(zip(table["traj_id"], table["step_id"]))].to_numpy(), table["q"], rtol=1e-6)


def test_same_seed_same_outputs_and_mc_target(project, td_run):
    again = run_critic(project, "td_again")
    assert again.exit_code == 0, again.output
    first, second = (json.loads((project / name / "critic.json").read_text()) for name in ("td", "td_again"))
    assert _without_timings(first) == _without_timings(second)
    for name in ("model.safetensors", stage.STEP_SCORES, stage.CANDIDATE_SCORES):
        assert (project / "td" / "critic" / name).read_bytes() == (project / "td_again" / "critic" / name).read_bytes(), name

    mc = run_critic(project, "mc", "--target", "mc")
    assert mc.exit_code == 0, mc.output
    metrics = json.loads((project / "mc" / "critic.json").read_text())
    assert metrics["target"] == "mc" and DoubleCritic.from_pretrained(project / "mc" / "critic").config.target == "mc"
    table = pq.read_table(project / "mc" / "critic" / stage.STEP_SCORES).to_pandas()
    frame = stage.load_stage_data(project / "features", "finetuned")
    returns = {(t, int(s)): g for t, s, g in zip(frame.traj_id, frame.step_id, frame.frame.mc_return)}
    np.testing.assert_allclose(table["td_error"], [returns[k] for k in zip(table["traj_id"], table["step_id"])] - table["q"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors

def test_missing_store_is_one_clear_error(tmp_path):
    project = make_project(tmp_path, materialized=False)
    with pytest.raises(DigiqError) as caught:
        stage.load_stage_data(project / "features", "finetuned")
    assert "digiq features materialize --variant finetuned" in str(caught.value) and "registry.db" in str(caught.value)
    (project / "params.yaml").write_text(PARAMS + f"features: {{embeddings: {project / 'absent'}}}\n")
    result = run_critic(project, "out")  # no store, and no embeddings to rebuild it from
    assert result.exit_code == 2 and "missing input table" in result.output and "Traceback" not in result.output
    assert str(project / "absent") in result.output and not (project / "out").exists()  # nothing half-written


def test_a_fresh_workspace_rebuilds_the_store_from_the_embeddings(tmp_path):
    """A queued `dvc exp run` copy or a clone after `dvc pull` has the embeddings but no Feast run-time state."""
    project = make_project(tmp_path, materialized=False)
    data = project / "data"
    (project / "params.yaml").write_text(PARAMS + f"collect: {{out: {data / 'raw'}}}\nlabel: {{out: {data / 'labels.parquet'}}}\n"
                                                  f"features: {{embeddings: {data / 'embeddings'}}}\n")
    result = run_critic(project, "out")
    assert result.exit_code == 0, result.output
    assert "materializing it from" in result.output and (project / "features" / "data" / "finetuned" / "registry.db").is_file()


def test_bad_target_is_refused(project):
    result = run_critic(project, "bad", "--target", "sarsa")
    assert result.exit_code == 2 and "td or mc" in result.output
    assert not (project / "bad").exists()


# ----------------------------------------------------------------------------- helpers

def test_split_holds_out_whole_trajectories_deterministically():
    traj = np.array([f"t{i // 3}" for i in range(30)], dtype=object)  # 10 trajectories of 3 steps
    held = stage.split_trajectories(traj, 0.2, seed=0)
    assert (held == stage.split_trajectories(traj, 0.2, seed=0)).all()
    assert len(set(traj[held])) == 2 and not set(traj[held]) & set(traj[~held])
    assert not stage.split_trajectories(traj, 0.0, seed=0).any()
    assert stage.split_trajectories(np.array(["a", "b"], dtype=object), 0.01, seed=0).sum() == 1  # ≥ 1 held out, never all
    with pytest.raises(DigiqError, match="val_fraction"):
        stage.split_trajectories(traj, 1.0, seed=0)


def test_non_finite_metrics_become_null():
    assert stage.finite_or_none({"a": float("nan"), "b": [1.0, float("inf")], "c": 0.5}) == {"a": None, "b": [1.0, None], "c": 0.5}


def test_candidate_classes_success_and_keys():
    actions = np.array([["a", "b", "a", None], ["c", "c", "d", "c"]], dtype=object)
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    distinct, draws = stage.candidate_classes(actions, mask)
    assert distinct.tolist() == [[True, True, False, False], [True, False, True, False]]
    assert draws.tolist() == [[2, 1, 0, 0], [3, 0, 1, 0]]
    traj = np.array(["x", "x", "y", "z", "z"], dtype=object)
    assert stage.trajectory_success(traj, np.array([0.0, 1.0, 0.0, 0.0, 0.0])).tolist() == [True, True, False, False, False]
    traj_id, step_id = stage.split_keys(np.array(["a/b/0", "c/12"], dtype=object))
    assert traj_id.tolist() == ["a/b", "c"] and step_id.tolist() == [0, 12]


def test_candidates_are_deduplicated_by_the_element_a_tap_hits(tmp_path):
    from digiq.actions import format_action
    from digiq.schema import Action, Step, Trajectory
    from digiq.store import DatasetWriter

    elements = json.dumps([{"ref": 7, "tag": "button", "bbox": [0.2, 0.2, 0.4, 0.6]}])
    writer = DatasetWriter(tmp_path / "raw", gamma=0.95, source="synthetic")
    shot, sha = writer.put_image(np.zeros((4, 4, 3), dtype=np.uint8))
    step = Step(traj_id="t0", step_id=0, task="x", goal="g", observation="o", screenshot=shot, screenshot_sha256=sha,
                action=Action.tap(0.3, 0.3), reward=1.0, done=True, elements=elements)
    writer.write_shard("x", [Trajectory(traj_id="t0", task="x", goal="g", steps=[step])])
    writer.finalize()
    taps = [format_action(Action.tap(*p)) for p in [(0.3, 0.3), (0.25, 0.5), (0.9, 0.9), (0.35, 0.21)]]
    actions = np.array([taps + [None]], dtype=object)
    mask = np.array([[True] * 4 + [False]])

    keys = stage.semantic_keys(actions, mask, np.array(["t0"]), np.array([0]), tmp_path / "raw")
    assert keys.tolist() == [["tap@7", "tap@7", "tap@none", "tap@7", None]]
    assert [c.tolist() for c in stage.candidate_classes(keys, mask)] == [[[True, False, True, False, False]], [[3, 0, 1, 0, 0]]]
    assert stage.candidate_classes(actions, mask)[0].tolist() == [[True, True, True, True, False]]  # as strings: all differ


def test_a_store_that_does_not_name_its_dataset_is_one_clear_error(tmp_path):
    project = make_project(tmp_path)
    sources = project / "features" / "data" / "finetuned" / "sources.json"
    sources.write_text(json.dumps({k: v for k, v in json.loads(sources.read_text()).items() if k != "dataset"}))
    with pytest.raises(DigiqError, match=r"sources\.json: dataset: .*digiq features materialize --variant finetuned"):
        stage.load_stage_data(project / "features", "finetuned")
