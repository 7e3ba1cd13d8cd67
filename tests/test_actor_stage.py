"""`digiq actor --method M` end to end: real Feast on synthetic sources, a real (briefly) trained critic, every method."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import (SMALL_CRITIC, command_app, copy_feature_repo, feature_project, project_params, write_params,
                      write_random_channels)
from digiq.actor import METHODS, CandidatePolicy, check_dims
from digiq.channels import Inputs
from digiq.cli import actor as actor_cli
from digiq.cli import critic as critic_cli
from digiq.errors import DigiqError
from digiq.pipelines import actor as stage
from digiq.training_data import read_training_data, split_trajectories
from digiq.viewer.tables import load_policy_scores

N_STATES, K, DIM = 60, 8, 16
VLM_ONLY = {"q": ["vlm"], "v": ["vlm"]}  # the synthetic sources serve the VLM channel
PARAMS = {"seed": 1, "critic": {**SMALL_CRITIC, "updates": 40, "inputs": VLM_ONLY},
          "actor": {"n": 4, "threshold": 0.0, "hidden": [32], "batch_size": 32, "updates": 40, "device": "cpu", "inputs": VLM_ONLY}}


def invoke(project: Path, *args: str):
    return CliRunner().invoke(command_app(critic_cli, actor_cli), [*args, "--params", str(project / "params.yaml")])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Synthetic sources materialized in Feast + a critic trained by `digiq critic`."""
    root = feature_project(tmp_path_factory.mktemp("actor_project"), n_states=N_STATES, k=K, dim=DIM, seed=2)
    write_params(root, **PARAMS)
    result = invoke(root, "critic", "--out", str(root / "models" / "critic"), "-S", f"critic.metrics={root / 'metrics' / 'critic.json'}",
                    "-S", f"critic.live_dir={root / 'dvclive' / 'critic'}")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def frame(project):
    return read_training_data(project_params(project).features)


def run_actor(project: Path, method: str, run: str = "main", *extra: str):
    """`digiq actor --method M` of ``project``: the policy in actors/<run>/<method>, metrics/<run>/<method>.json."""
    return invoke(project, "actor", "--method", method, "--out", str(project / "actors" / run),
                  "-S", f"critic.out={project / 'models' / 'critic'}", "-S", f"actor.metrics={project / 'metrics' / run}",
                  "-S", f"actor.live_dir={project / 'dvclive' / run}", *extra)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_policy_metrics_and_scores(project, frame, method):
    result = run_actor(project, method)
    assert result.exit_code == 0, result.output
    out = project / "actors" / "main" / method
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", stage.METRICS_FILE, stage.POLICY_SCORES}
    metrics = json.loads((project / "metrics" / "main" / f"{method}.json").read_text())
    assert metrics == json.loads((out / stage.METRICS_FILE).read_text())
    assert metrics["method"] == method and metrics["used_critic"]
    held_out = split_trajectories(frame.traj_id, PARAMS["critic"].get("val_fraction", 0.1), PARAMS["seed"])
    assert metrics["n_states"] == N_STATES - held_out.sum() and metrics["n_heldout"] == held_out.sum() > 0  # the critic's split
    assert metrics["kl_prior_heldout"] >= 0.0 and np.isfinite(metrics["heldout_target_ce"])
    assert 0.0 < metrics["frac_states_kept"] <= 1.0 and np.isfinite(metrics["train_loss"])
    assert isinstance(metrics["mean_advantage_kept"], float)
    if method == "filtered-bc":  # successful trajectories only
        assert metrics["n_kept"] == int(frame.success[~held_out].sum()) < metrics["n_states"]
    if method == "bc":
        assert metrics["n_kept"] == metrics["n_states"]

    policy = CandidatePolicy.from_pretrained(out)
    assert policy.config.method == method and policy.config.n == 4 and policy.config.seed == 1

    # the viewer's contract: probabilities in [0, 1], at most one pick per step
    assert len(load_policy_scores(out / stage.POLICY_SCORES, top_k=3)) == N_STATES
    scores = pq.read_table(out / stage.POLICY_SCORES).to_pandas()
    assert len(scores) == int(frame.distinct.sum())  # one row per distinct candidate
    per_step = scores.groupby(["traj_id", "step_id"])
    np.testing.assert_allclose(per_step["prob"].sum(), 1.0, rtol=1e-6)
    assert (per_step["chosen"].sum() == 1).all()
    # the pick is the saved policy's argmax
    data = frame.transitions(inputs=policy.inputs)
    acts = policy.act(data.s, data.cand_sa, data.cand_mask, data.cand_count)
    picked = scores[scores["chosen"]].set_index(["traj_id", "step_id"])["cand_idx"]
    assert [picked[(t, int(s))] for t, s in zip(frame.traj_id, frame.step_id)] == acts.tolist()

    with open(project / "dvclive" / "main" / method / "plots" / "metrics" / "train" / "loss.tsv") as f:
        assert len(list(csv.DictReader(f, delimiter="\t"))) == 1  # log_every 50 > 40 updates: one point at the end


def test_same_seed_same_policy(project):
    for run in ("a", "b"):
        result = run_actor(project, "digiq", run)
        assert result.exit_code == 0, result.output
    a, b = (project / "actors" / run / "digiq" for run in ("a", "b"))
    for file in ("model.safetensors", stage.POLICY_SCORES):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    strip = lambda m: {k: v for k, v in m.items() if k != "timings_s"}
    assert strip(json.loads((a / stage.METRICS_FILE).read_text())) == strip(json.loads((b / stage.METRICS_FILE).read_text()))


def test_missing_critic_is_refused_for_advantage_methods_only(project, tmp_path):
    def run(method: str):
        return run_actor(project, method, "no_critic", "-S", f"critic.out={tmp_path / 'none'}")

    result = run("awr")
    assert result.exit_code == 2 and "digiq critic" in result.output and "config.json" in result.output
    assert not (project / "actors" / "no_critic" / "awr").exists()
    result = run("bc")
    assert result.exit_code == 0, result.output
    metrics = json.loads((project / "metrics" / "no_critic" / "bc.json").read_text())
    assert not metrics["used_critic"] and metrics["mean_advantage_kept"] is None


def test_unknown_method_and_missing_sources_are_clear_errors(project, tmp_path):
    result = run_actor(project, "ppo")
    assert result.exit_code == 2 and "unknown method 'ppo'" in result.output and not (project / "actors" / "main" / "ppo").exists()
    copy_feature_repo(tmp_path)
    params = project_params(tmp_path, actor={"out": str(tmp_path / "out")}, critic={"out": str(tmp_path / "none")})
    with pytest.raises(DigiqError, match="digiq features materialize"):
        stage.run(params, method="bc")
    assert not (tmp_path / "out").exists()


def test_critic_of_another_dimension_is_refused(project, frame, tmp_path):
    from digiq.config import CriticParams
    from digiq.critic import DoubleCritic

    DoubleCritic(DIM + 1, DIM + 1, CriticParams(hidden=[4])).save_pretrained(tmp_path / "critic")
    with pytest.raises(DigiqError, match="re-run `digiq critic`"):
        check_dims(DoubleCritic.from_pretrained(tmp_path / "critic"), frame.transitions(), tmp_path / "critic")
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("method", ["digiq", "digirl"])
def test_the_default_channel_inputs_train_critic_and_policy(tmp_path, method):
    """Default inputs everywhere: the stage reads the channels for the critic's advantages (or DigiRL's values) and
    for the policy's own x_V, x_Q; the policy's widths are the channel widths."""
    root = feature_project(tmp_path, n_states=N_STATES, k=K, dim=DIM, seed=2)
    write_random_channels(root)
    write_params(root, seed=1, critic={**SMALL_CRITIC, "updates": 40, "lrs": [1e-3]},
                 actor={**PARAMS["actor"], "inputs": Inputs().model_dump()},
                 digirl={"step_updates": 5, "instruction_updates": 5})
    result = invoke(root, "critic", "--out", str(root / "models" / "critic"), "-S", f"critic.metrics={root / 'critic.json'}",
                    "-S", f"critic.live_dir={root / 'dvclive' / 'critic'}")
    assert result.exit_code == 0, result.output
    result = run_actor(root, method)
    assert result.exit_code == 0, result.output
    policy = CandidatePolicy.from_pretrained(root / "actors" / "main" / method)
    assert (policy.d_s, policy.d_sa) == (8 + 3 + 6 + 3, DIM + 8 + 3 + 6 + 3 + 6)
