"""Fixtures shared by the test modules: synthetic feature-store projects (the embed/label/collect/candidates contracts
exactly, random vectors), a Typer app holding a few `digiq` commands, and a toy MDP's transitions for the critic
and actor tests."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from digiq import feature_contract as fc
from digiq.atomic import atomic_path, write_json

if TYPE_CHECKING:
    import torch

    from digiq.transitions import Transitions

ROOT = Path(__file__).resolve().parents[1]
SMALL_CRITIC = {"hidden": [32], "batch_size": 32, "log_every": 20, "device": "cpu"}  # trains in seconds on the CPU


def write_synthetic_sources(root: str | Path, *, n_states: int = 40, k: int = 64, dim: int = 384, max_len: int = 6,
                            variant: str = "finetuned", seed: int = 0, gamma: float = 0.95,
                            dim_candidate: int | None = None) -> dict[str, Path]:
    """A data/ folder with exactly the collect/label/candidates/embed contracts (random vectors, fixed seed).

    Writes ``raw/`` (a digiq dataset of ~n_states steps: trajectories of 1..max_len steps, half ending in success,
    half cut off), ``labels.parquet`` (non-terminal steps), ``candidates.parquet`` and
    ``embeddings/<variant>/{states,candidates,embedding.json}`` (f(s, a) of size ``dim_candidate``, default ``dim``)."""
    from digiq.actions import format_action
    from digiq.candidates import candidate_table, write_candidates
    from digiq.schema import Action, Step, Trajectory
    from digiq.store import Dataset, DatasetWriter

    root = Path(root)
    dim_candidate = dim_candidate or dim
    rng = np.random.default_rng(seed)
    writer = DatasetWriter(root / "raw", gamma=gamma, source="synthetic")
    shot, sha = writer.put_image(np.zeros((4, 4, 3), dtype=np.uint8))
    pool = [format_action(Action.tap(round(float(y), 4), round(float(x), 4))) for y, x in rng.random((256, 2))]
    trajectories, lengths = [], []
    while sum(lengths) < n_states:
        lengths.append(int(min(rng.integers(1, max_len + 1), n_states - sum(lengths))))
    for t, length in enumerate(lengths):
        success = bool(rng.random() < 0.5)
        steps = [Step(traj_id=f"traj{t:05d}", step_id=s, task="synthetic", goal="g", observation="o",
                      screenshot=shot, screenshot_sha256=sha, action=Action.tap(0.5, 0.5),
                      reward=float(success and s == length - 1), done=success and s == length - 1)
                 for s in range(length)]
        trajectories.append(Trajectory(traj_id=f"traj{t:05d}", task="synthetic", goal="g", steps=steps))
    writer.write_shard("synthetic", trajectories)
    writer.finalize()
    steps_table = Dataset(root / "raw").table()
    traj = np.asarray(steps_table["traj_id"].to_pylist(), dtype=object)
    step = np.asarray(steps_table["step_id"], dtype=np.int32)
    done = np.asarray(steps_table["done"], dtype=bool)
    n = len(traj)
    keys = np.array([fc.state_key(a, b) for a, b in zip(traj, step)], dtype=object)
    stamps = pa.array([fc.EPOCH + timedelta(seconds=i) for i in range(n)], fc.TIMESTAMP)

    def vectors(count: int, dim: int = dim) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(count * dim, dtype=np.float32)), dim)

    actions = [pool[i] for i in rng.integers(0, len(pool), n * k)]  # drawn first: the same for every vector size
    for i in range(n):  # candidate 0 is the dataset action
        actions[i * k] = steps_table["action"][i].as_py()
    meta = {"model_hash": pa.array(["synthetic0"] * n), "layer": pa.array(np.full(n, 4, dtype=np.int32))}
    states = pa.table({"state_key": keys, "traj_id": traj, "step_id": step, "event_timestamp": stamps,
                       "embedding": vectors(n), **meta})
    rows = np.repeat(np.arange(n), k)
    idx = np.tile(np.arange(k, dtype=np.int32), n)
    candidates = pa.table({
        "cand_key": [fc.cand_key(keys[r], i) for r, i in zip(rows, idx)], "state_key": keys[rows], "traj_id": traj[rows],
        "step_id": step[rows], "cand_idx": idx, "action": actions, "event_timestamp": stamps.take(rows),
        "embedding": vectors(n * k, dim_candidate), "model_hash": meta["model_hash"].take(rows), "layer": meta["layer"].take(rows),
    })
    keep = ~done  # terminal transitions carry no ε-label (MiniWoB's black final frame)
    mse = rng.uniform(0.0, 80.0, int(keep.sum()))
    labels = pa.table({"traj_id": traj[keep], "step_id": step[keep], "action_kind": ["tap"] * len(mse), "mse": mse,
                       "label": np.where(mse > 30.0, "Yes", "No"), "epsilon": np.full(len(mse), 30.0),
                       "scale": np.full(len(mse), 0.25)})
    out = {"dataset": root / "raw", "labels": root / "labels.parquet", "candidate_table": root / "candidates.parquet",
           "states": root / "embeddings" / variant / fc.STATES_FILE, "candidates": root / "embeddings" / variant / fc.CANDIDATES_FILE}
    for name, tab in (("labels", labels), ("states", states), ("candidates", candidates)):
        out[name].parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out[name]) as tmp:
            pq.write_table(tab, tmp)
    write_candidates(candidate_table((r, actions[i * k:(i + 1) * k]) for i, r in enumerate(steps_table.to_pylist())),
                     out["candidate_table"])
    write_json(out["states"].parent / fc.MANIFEST_FILE, {"dim_state": dim, "dim_candidate": dim_candidate, "variant": variant})
    return out


def project_params(project: Path, text: str = "", **sections: Any) -> Any:
    """Params of a synthetic project (features/ and data/ under ``project``): ``text`` (params.yaml lines) and
    ``sections`` ({section: {key: value}}) on top of the paths."""
    import yaml

    from digiq.params_file import validate_params

    data = project / "data"
    raw: dict[str, Any] = {
        "collect": {"out": str(data / "raw")}, "label": {"out": str(data / "labels.parquet")},
        "candidates": {"out": str(data / "candidates.parquet")},
        "features": {"repo": str(project / "features"), "embeddings": str(data / "embeddings"), "derived": str(data / "features"),
                     "metrics": str(project / "metrics" / "features.json")},
        "channels": {"out": str(data / "channels"), "metrics": str(project / "metrics" / "channels.json")},  # served when written
    }
    for section, values in {**(yaml.safe_load(text) or {}), **sections}.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return validate_params(raw)


def copy_feature_repo(project: Path) -> Path:
    """The repository's features/ (definitions, feature_store.yaml) copied into ``project``, without run-time state."""
    shutil.copytree(ROOT / "features", project / "features", ignore=shutil.ignore_patterns("data", "__pycache__"))
    return project / "features"


def feature_project(root: Path, *, materialized: bool = True, **synthetic: Any) -> Path:
    """features/ copied from the repository and synthetic data/ under ``root``; the store materialized unless told
    otherwise (``synthetic``: :func:`write_synthetic_sources`' options)."""
    from digiq.feature_sources import FeatureInputs
    from digiq.feature_write import materialize

    copy_feature_repo(root)
    write_synthetic_sources(root / "data", **synthetic)
    if materialized:
        materialize(FeatureInputs.from_params(project_params(root)))
    return root


def write_params(project: Path, text: str = "", **sections: Any) -> Path:
    """``project``/params.yaml: the project's paths plus ``text`` (params.yaml lines) and ``sections``."""
    import yaml

    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(project_params(project, text, **sections).model_dump(mode="json"), sort_keys=False))
    return path


def command_app(*modules: Any) -> typer.Typer:
    """A Typer group holding the commands ``modules`` register, as `digiq` does (so they are sub-commands)."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    for module in modules:
        module.register(app)
    return app


def toy_transitions(episodes: int = 400, *, steps: int = 3, k: int = 8, d: int = 8, p_correct: float = 0.6,
                    gamma: float = 0.95, seed: int = 0, mdp_seed: int = 0) -> Transitions:
    """A tiny MDP where the action matters (critic and actor tests).

    Each episode must take ``steps`` correct actions in a row; at every state exactly one of ``k``
    candidates is correct (its action features lean along a fixed hidden direction). π_β picks it with
    probability ``p_correct``; a wrong action ends the episode with reward 0, the last correct one gives
    reward 1. f(s) = embedding of the step index + noise; f(s, a) = [f(s), action features] (d_sa = 2d).
    ``mdp_seed`` fixes the MDP (step embeddings, the hidden direction), ``seed`` the sampled episodes.
    """
    import torch

    from digiq.transitions import Transitions

    g = torch.Generator().manual_seed(mdp_seed)
    step_emb = torch.randn(steps + 1, d, generator=g)
    good_dir = torch.randn(d, generator=g)
    g.manual_seed(seed + 1_000_003)
    rows: dict[str, list] = {name: [] for name in ("s", "sa", "s_next", "reward", "done", "cand_sa", "episode")}
    for ep in range(episodes):
        t = 0
        while True:
            s = step_emb[t] + 0.1 * torch.randn(d, generator=g)
            actions = torch.randn(k, d, generator=g)
            actions[0] += 1.5 * good_dir  # candidate 0 before shuffling is the correct one
            correct = bool(torch.rand(1, generator=g) < p_correct)
            chosen = 0 if correct else int(torch.randint(1, k, (1,), generator=g))
            order = [chosen] + [i for i in torch.randperm(k, generator=g).tolist() if i != chosen]
            cand = torch.cat([s.expand(k, d), actions[order]], dim=1)
            t_next = t + 1 if correct else t
            ends = (not correct) or t_next == steps
            rows["s"].append(s); rows["sa"].append(cand[0]); rows["cand_sa"].append(cand)
            rows["s_next"].append(step_emb[t_next] + 0.1 * torch.randn(d, generator=g))
            rows["reward"].append(float(correct and t_next == steps)); rows["done"].append(float(ends))
            rows["episode"].append(ep)
            t = t_next
            if ends:
                break
    reward, done = torch.tensor(rows["reward"]), torch.tensor(rows["done"])
    episode = torch.tensor(rows["episode"])
    mc_return = _discounted_returns(reward, done, gamma)
    success = torch.zeros(episodes, dtype=torch.bool).index_put_((episode[reward > 0],), torch.tensor(True))
    return Transitions(s=torch.stack(rows["s"]), sa=torch.stack(rows["sa"]), s_next=torch.stack(rows["s_next"]),
                       reward=reward, done=done, mc_return=mc_return, cand_sa=torch.stack(rows["cand_sa"]),
                       traj_success=success[episode], source="toy_transitions")


def _discounted_returns(reward: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    import torch

    """G_t = r_t + γ (1 − done_t) G_{t+1}, over consecutive rows of whole episodes."""
    out, g = torch.zeros_like(reward), 0.0
    for i in range(len(reward) - 1, -1, -1):
        g = reward[i].item() + gamma * (1.0 - done[i].item()) * g
        out[i] = g
    return out


def write_random_channels(project: Path, d_image: int = 4, d_e: int = 3) -> None:
    """data/channels/ in the `digiq channels` contract for every step and candidate of ``project`` (random vectors)."""
    from digiq.channel_tables import vectors, write_tables
    from digiq.feature_contract import (TIMESTAMP, cand_key, channel_candidates_schema, channel_states_schema,
                                       event_timestamp, state_key)

    rng = np.random.default_rng(0)
    cands = pq.read_table(project / "data" / "candidates.parquet").to_pylist()
    steps = sorted({(c["traj_id"], c["step_id"]) for c in cands})
    n = len(steps)
    states = pa.table({"state_key": [state_key(t, s) for t, s in steps], "traj_id": [t for t, _ in steps],
                       "step_id": pa.array([s for _, s in steps], pa.int32()),
                       "event_timestamp": pa.array([event_timestamp(s) for _, s in steps], TIMESTAMP),
                       "image": vectors(rng.normal(size=(n, 2 * d_image))), "goal": vectors(rng.normal(size=(n, d_e))),
                       "prev_action": vectors(rng.normal(size=(n, 2 * d_e))), "prev_type": [""] * n, "prev_text": [""] * n,
                       "fields": vectors(rng.normal(size=(n, d_e))), "fields_text": [""] * n},
                      schema=channel_states_schema(2 * d_image, d_e, 2 * d_e, d_e))
    keys = [state_key(c["traj_id"], c["step_id"]) for c in cands]
    candidates = pa.table({"cand_key": [cand_key(k, c["cand_idx"]) for k, c in zip(keys, cands)], "state_key": keys,
                           "cand_idx": pa.array([c["cand_idx"] for c in cands], pa.int32()),
                           "event_timestamp": pa.array([event_timestamp(c["step_id"]) for c in cands], TIMESTAMP),
                           "action": vectors(rng.normal(size=(len(cands), 2 * d_e))), "action_type": ["tap"] * len(cands),
                           "action_text": ["x"] * len(cands)}, schema=channel_candidates_schema(2 * d_e))
    write_tables(project / "data" / "channels", states, candidates)
