"""`digiq actor --method M` end to end: real Feast on synthetic sources, a real (briefly) trained critic, every method."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import typer
from typer.testing import CliRunner

from digiq.actor import CandidatePolicy
from digiq.cli import actor as actor_cli
from digiq.cli import critic as critic_cli
from digiq.errors import DigiqError
from digiq.pipelines import actor as stage
from digiq.pipelines import critic as critic_stage
from digiq.pipelines import features as fx
from digiq.viewer.tables import load_policy_scores

ROOT = Path(__file__).resolve().parents[1]
N_STATES, K, DIM = 60, 8, 16
PARAMS = """\
seed: 1
critic:
  updates: 40
  hidden: [32]
  batch_size: 32
  log_every: 20
  device: cpu
actor:
  n: 4
  threshold: 0.0
  hidden: [32]
  batch_size: 32
  updates: 40
  device: cpu
"""


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a group, so the commands are sub-commands as in `digiq actor`
        """test app"""

    critic_cli.register(app)
    actor_cli.register(app)
    return app


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Synthetic sources materialized in Feast + a critic trained by `digiq critic`."""
    root = tmp_path_factory.mktemp("actor_project")
    shutil.copytree(ROOT / "features", root / "features", ignore=shutil.ignore_patterns("data", "__pycache__"))
    paths = fx.write_synthetic_sources(root / "data", n_states=N_STATES, k=K, dim=DIM, seed=2)
    inputs = fx.Inputs(repo=(root / "features").resolve(), variant="finetuned", states=paths["states"].resolve(),
                       candidates=paths["candidates"].resolve(), labels=paths["labels"].resolve(), dataset=paths["dataset"].resolve())
    fx.materialize(inputs, progress=False)
    (root / "params.yaml").write_text(PARAMS)
    result = CliRunner().invoke(_app(), ["critic", "--repo", str(root / "features"), "--out", str(root / "models" / "critic"),
                                         "--metrics", str(root / "metrics" / "critic.json"), "--live", str(root / "dvclive" / "critic"),
                                         "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def frame(project):
    return critic_stage.load_stage_data(project / "features", "finetuned")


def run_actor(project: Path, method: str, name: str | None = None, *extra: str):
    name = name or method
    args = ["actor", "--method", method, "--repo", str(project / "features"), "--critic", str(project / "models" / "critic"),
            "--out", str(project / "models" / "actor" / name), "--metrics", str(project / "metrics" / "actor" / f"{name}.json"),
            "--live", str(project / "dvclive" / "actor" / name), "--params", str(project / "params.yaml"), *extra]
    return CliRunner().invoke(_app(), args)


@pytest.mark.parametrize("method", stage.METHODS)
def test_each_method_writes_policy_metrics_and_scores(project, frame, method):
    result = run_actor(project, method)
    assert result.exit_code == 0, result.output
    out = project / "models" / "actor" / method
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", stage.METRICS_FILE, stage.POLICY_SCORES}
    metrics = json.loads((project / "metrics" / "actor" / f"{method}.json").read_text())
    assert metrics == json.loads((out / stage.METRICS_FILE).read_text())
    assert metrics["method"] == method and metrics["used_critic"] and metrics["n_states"] == N_STATES
    assert 0.0 < metrics["frac_states_kept"] <= 1.0 and np.isfinite(metrics["train_loss"])
    assert isinstance(metrics["mean_advantage_kept"], float)
    if method == "filtered-bc":  # successful trajectories only
        assert metrics["n_kept"] == int(frame.success.sum()) < N_STATES
    if method == "bc":
        assert metrics["n_kept"] == N_STATES

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
    data = frame.transitions()
    acts = policy.act(data.s, data.cand_sa, data.cand_mask, data.cand_count)
    picked = scores[scores["chosen"]].set_index(["traj_id", "step_id"])["cand_idx"]
    assert [picked[(t, int(s))] for t, s in zip(frame.traj_id, frame.step_id)] == acts.tolist()

    with open(project / "dvclive" / "actor" / method / "plots" / "metrics" / "train" / "loss.tsv") as f:
        assert len(list(csv.DictReader(f, delimiter="\t"))) == 1  # log_every 50 > 40 updates: one point at the end


def test_same_seed_same_policy(project):
    for name in ("digiq_a", "digiq_b"):
        result = run_actor(project, "digiq", name)
        assert result.exit_code == 0, result.output
    a, b = (project / "models" / "actor" / name for name in ("digiq_a", "digiq_b"))
    for file in ("model.safetensors", stage.POLICY_SCORES):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    strip = lambda m: {k: v for k, v in m.items() if k != "timings_s"}
    assert strip(json.loads((a / stage.METRICS_FILE).read_text())) == strip(json.loads((b / stage.METRICS_FILE).read_text()))


def test_missing_critic_is_refused_for_advantage_methods_only(project, tmp_path):
    args = lambda method: ["actor", "--method", method, "--repo", str(project / "features"), "--critic", str(tmp_path / "none"),
                           "--out", str(tmp_path / method), "--metrics", str(tmp_path / f"{method}.json"),
                           "--live", str(tmp_path / "live" / method), "--params", str(project / "params.yaml")]
    result = CliRunner().invoke(_app(), args("awr"))
    assert result.exit_code == 2 and "digiq critic" in result.output and "config.json" in result.output
    assert not (tmp_path / "awr").exists()
    result = CliRunner().invoke(_app(), args("bc"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "bc.json").read_text())
    assert not metrics["used_critic"] and metrics["mean_advantage_kept"] is None


def test_unknown_method_and_missing_store_are_clear_errors(project, tmp_path):
    result = run_actor(project, "ppo")
    assert result.exit_code == 2 and "digiq" in result.output and not (project / "models" / "actor" / "ppo").exists()
    shutil.copytree(ROOT / "features", tmp_path / "features", ignore=shutil.ignore_patterns("data", "__pycache__"))
    config = stage.actor_config(__import__("digiq.config", fromlist=["Params"]).Params(), "bc")
    with pytest.raises(DigiqError, match="digiq features materialize --variant finetuned"):
        stage.run(config, repo=tmp_path / "features", variant="finetuned", critic_dir=tmp_path / "none", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_critic_of_another_dimension_is_refused(project, frame, tmp_path):
    from digiq.critic import CriticConfig, DoubleCritic

    DoubleCritic(DIM + 1, DIM + 1, CriticConfig(hidden=(4,))).save_pretrained(tmp_path / "critic")
    with pytest.raises(DigiqError, match="re-run `digiq critic`"):
        stage.check_dims(DoubleCritic.from_pretrained(tmp_path / "critic"), frame, tmp_path / "critic")
    assert torch.get_num_threads() >= 1
