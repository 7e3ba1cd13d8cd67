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
from typer.testing import CliRunner

from conftest import SMALL_CRITIC, command_app, feature_project, project_params, write_params, write_random_channels
from digiq.cli import critic as critic_cli
from digiq.config import CriticParams
from digiq.critic import DoubleCritic
from digiq.errors import DigiqError
from digiq.pipelines import critic as stage
from digiq.feature_contract import split_state_keys, state_key
from digiq.stage_outputs import finite_or_none
from digiq.training_data import read_training_data, split_trajectories, trajectory_success
from digiq.viewer.tables import load_candidate_scores, load_step_scores

N_STATES, K, DIM = 60, 8, 16
PARAMS = {"seed": 2, "critic": {**SMALL_CRITIC, "updates": 60, "inputs": {"q": ["vlm"], "v": ["vlm"]}}}


def run_critic(project: Path, name: str, *extra: str):
    """`digiq critic` of ``project``, its outputs under ``project/name``."""
    out = project / name
    args = ["critic", "--params", str(project / "params.yaml"), "--out", str(out / "critic"),
            "-S", f"critic.metrics={out / 'critic.json'}", "-S", f"critic.live_dir={out / 'dvclive'}", *extra]
    return CliRunner().invoke(command_app(critic_cli), args)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = feature_project(tmp_path_factory.mktemp("critic_project"), n_states=N_STATES, k=K, dim=DIM, seed=1)
    write_params(project, **PARAMS)
    return project


@pytest.fixture(scope="module")
def td_run(project) -> Path:
    result = run_critic(project, "td")
    assert result.exit_code == 0, result.output
    assert "action sensitivity" in result.output
    return project / "td"


@pytest.fixture(scope="module")
def frame(project):
    return read_training_data(project_params(project).features)


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

    # the kept update and rate (three rates by default), recorded in metrics and config.json
    selection, grid = metrics["selection"], metrics["lr_grid"]
    assert selection["select"] == "best_return" and [row["lr"] for row in grid] == CriticParams().lrs
    chosen = [row for row in grid if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["return_mse"] == min(row["return_mse"] for row in grid)
    assert (selection["lr"], selection["step"], selection["return_mse"]) == (chosen[0]["lr"], chosen[0]["selected_step"], chosen[0]["return_mse"])
    config = json.loads((td_run / "critic" / "config.json").read_text())["config"]
    assert config["inputs"] == metrics["inputs"] == {"q": ["vlm"], "v": ["vlm"]}
    assert (config["lr"], config["selected_step"], config["select"]) == (selection["lr"], selection["step"], "best_return")
    per_task = metrics["diagnostics"]["per_task"]  # synthetic ids are not <task>.s<seed>.e<n>: one "unknown" task
    assert list(per_task) == ["unknown"] and per_task["unknown"]["states"] == rows["val"]

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

    mc = run_critic(project, "mc", "-S", "critic.target=mc")
    assert mc.exit_code == 0, mc.output
    metrics = json.loads((project / "mc" / "critic.json").read_text())
    assert metrics["target"] == "mc" and DoubleCritic.from_pretrained(project / "mc" / "critic").config.target == "mc"
    table = pq.read_table(project / "mc" / "critic" / stage.STEP_SCORES).to_pandas()
    frame = read_training_data(project_params(project).features)
    returns = {(t, int(s)): g for t, s, g in zip(frame.traj_id, frame.step_id, frame.frame.mc_return)}
    np.testing.assert_allclose(table["td_error"], [returns[k] for k in zip(table["traj_id"], table["step_id"])] - table["q"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- inputs and errors

def test_candidates_are_the_candidate_tables_classes(project, frame):
    """The critic trains on the candidates stage's de-duplication, served by the store (no second rule)."""
    table = pq.read_table(project / "data" / "candidates.parquet").to_pandas().groupby(["traj_id", "step_id"])["draws"].agg(list)
    expected = np.array([table[(t, int(s))] for t, s in zip(frame.traj_id, frame.step_id)], dtype=np.float32)
    assert np.array_equal(frame.draws, expected) and np.array_equal(frame.distinct, expected > 0)
    assert (frame.draws.sum(1) == K).all() and (frame.distinct.sum(1) < K).any()  # some candidates are repeats


def test_missing_sources_are_one_clear_error(tmp_path):
    project = feature_project(tmp_path, materialized=False, n_states=N_STATES, k=K, dim=DIM, seed=1)
    with pytest.raises(DigiqError) as caught:
        read_training_data(project_params(project).features)
    assert "digiq features materialize" in str(caught.value) and "transitions.parquet" in str(caught.value)
    write_params(project, **PARAMS, features={"embeddings": str(project / "absent")})
    result = run_critic(project, "out")
    assert result.exit_code == 2 and "missing feature source 'states'" in result.output and "Traceback" not in result.output
    assert str(project / "absent") in result.output and not (project / "out").exists()  # nothing half-written


def test_a_fresh_workspace_trains_from_the_tracked_sources_alone(tmp_path):
    """A queued `dvc exp run` copy or a clone after `dvc pull` has the sources DVC tracks but no Feast run-time state."""
    project = feature_project(tmp_path, n_states=N_STATES, k=K, dim=DIM, seed=1)
    shutil.rmtree(project / "features" / "data")
    write_params(project, **PARAMS)
    result = run_critic(project, "out")
    assert result.exit_code == 0, result.output
    assert not (project / "features" / "data").exists()


def test_the_critic_reads_the_channels_critic_inputs_selects(tmp_path):
    """Default inputs: x_V = image ⊕ goal ⊕ prev_action ⊕ fields, x_Q = vlm ⊕ those ⊕ action; recorded in config.json."""
    project = feature_project(tmp_path, n_states=N_STATES, k=K, dim=DIM, seed=1)
    write_random_channels(project)
    write_params(project, seed=2, critic={**SMALL_CRITIC, "updates": 40, "lrs": [1e-3]})
    result = run_critic(project, "channels")
    assert result.exit_code == 0, result.output
    critic = DoubleCritic.from_pretrained(project / "channels" / "critic")
    assert (critic.d_s, critic.d_sa) == (8 + 3 + 6 + 3, DIM + 8 + 3 + 6 + 3 + 6) and critic.config.inputs == CriticParams().inputs
    metrics = json.loads((project / "channels" / "critic.json").read_text())
    assert metrics["inputs"] == {"q": ["vlm", "image", "goal", "prev_action", "fields", "action"],
                                 "v": ["image", "goal", "prev_action", "fields"]}
    assert metrics["diagnostics"]["val"]["ranking_states"] > 0


def test_selection_without_held_out_trajectories_is_refused(project):
    result = run_critic(project, "no_val", "-S", "critic.val_fraction=0")
    assert result.exit_code == 2 and "critic.select" in result.output and "best_return needs held-out trajectories" in result.output
    assert not (project / "no_val").exists()


def test_bad_target_is_refused(project):
    result = run_critic(project, "bad", "-S", "critic.target=sarsa")
    assert result.exit_code == 2 and "critic.target" in result.output and "'td' or 'mc'" in result.output
    assert not (project / "bad").exists()


# ----------------------------------------------------------------------------- helpers

def test_split_holds_out_whole_trajectories_deterministically():
    traj = np.array([f"t{i // 3}" for i in range(30)], dtype=object)  # 10 trajectories of 3 steps
    held = split_trajectories(traj, 0.2, seed=0)
    assert (held == split_trajectories(traj, 0.2, seed=0)).all()
    assert len(set(traj[held])) == 2 and not set(traj[held]) & set(traj[~held])
    assert not split_trajectories(traj, 0.0, seed=0).any()
    assert split_trajectories(np.array(["a", "b"], dtype=object), 0.01, seed=0).sum() == 1  # ≥ 1 held out, never all
    with pytest.raises(DigiqError, match="val_fraction"):
        split_trajectories(traj, 1.0, seed=0)


def test_non_finite_metrics_become_null_success_and_keys():
    assert finite_or_none({"a": float("nan"), "b": [1.0, float("inf")], "c": 0.5}) == {"a": None, "b": [1.0, None], "c": 0.5}
    traj = np.array(["x", "x", "y", "z", "z"], dtype=object)
    assert trajectory_success(traj, np.array([0.0, 1.0, 0.0, 0.0, 0.0])).tolist() == [True, True, False, False, False]
    traj_id, step_id = split_state_keys(np.array(["a/b/0", "c/12"], dtype=object))
    assert traj_id.tolist() == ["a/b", "c"] and step_id.tolist() == [0, 12]
    assert [k.tolist() for k in split_state_keys([state_key("a/b", 3)])] == [["a/b"], [3]]  # built and parsed by one contract
