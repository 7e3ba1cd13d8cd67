"""Crash safety: each long stage, SIGKILLed at seeded-random points and re-run, ends equal to an uninterrupted run.

For finetune, embed, critic and evaluate (collect: tests/test_collect.py) the real `digiq <stage>` runs in its
own process on a small configuration. One uninterrupted run is the reference; another is killed at two
points — once a seeded-random number of progress events (checkpoints, chunks, shards) has been seen, plus a
seeded-random delay cut short by the next event — re-run after each kill, then run to completion. Each kill must
land before the stage's final output exists. Afterwards: the outputs equal the reference (file hashes for data, metrics without
timings for training), no temporary file of an atomic write is left, and no digiq browser survives.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from processes import Files, Replacements, kill_at, run_stage, sha256, start_stage, temp_files, tree_hashes, wait_for_no_browsers
from conftest import feature_project, write_params as write_project_params
from test_finetune import base, data  # noqa: F401 - module fixtures: tiny LLaVA checkpoint, labelled PNG dataset
from tiny_llava import save_tiny_llava

pytestmark = pytest.mark.slow

KILLS = 2  # kill points per stage, chained: kill, re-run and kill again, re-run to the end


def without(metrics: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in keys}


def kill_and_resume(name: str, argv: list[str], root: Path, progress: Any, last_output: Path, *,
                    events: tuple[int, int], delay: float) -> list[dict[str, float]]:
    """Run ``argv`` killed at KILLS seeded-random points (progress events in ``events``, then up to ``delay`` s), then
    to completion. ``progress(watch_start)`` makes a fresh progress counter; ``last_output`` is written last by the
    stage, so its absence proves a kill came before completion. Returns the kill points."""
    rng = random.Random(f"{name}-kills")
    points = []
    for attempt in range(KILLS):
        point = {"events": rng.randint(*events), "delay": round(rng.uniform(0.0, delay), 3)}
        proc = start_stage(argv, root / f"killed-{attempt}.log")
        point["seen"] = kill_at(proc, progress(), point["events"], point["delay"])
        assert not last_output.exists(), f"kill {attempt} came after the stage finished"
        points.append(point)
    run_stage(argv, root / "resumed.log")
    print(f"{name} kill points: {points}")
    return points


def write_params(path: Path, sections: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------- finetune


def finetune_params(root: Path, dataset: Path, labels: Path, base_model: Path) -> Path:
    section = dict(lora_r=4, lora_alpha=8, epochs=4, batch_size=4, val_fraction=0.25, lr=5e-3, probe_layer=1,
                   checkpoint_every=2, dtype="float32", out=str(root / "model"), metrics=str(root / "metrics.json"),
                   live_dir=str(root / "live"), checkpoint_dir=str(root / "ckpt"))
    return write_params(root / "params.yaml", {"collect": {"out": str(dataset)}, "label": {"out": str(labels)},
                                                "model": {"base": str(base_model)}, "finetune": section})


def test_finetune_killed_twice_resumes_to_the_same_metrics(tmp_path, base, data):  # noqa: F811 - fixtures
    runs = {}
    for name in ("reference", "killed"):
        root = tmp_path / name
        root.mkdir()
        runs[name] = root, ["finetune", "--params", str(finetune_params(root, *data, base))]
    ref_root, ref_argv = runs["reference"]
    run_stage(ref_argv, ref_root / "run.log")
    root, argv = runs["killed"]
    # 24 training rows, batch 4, 4 epochs: 24 steps, a checkpoint every 2 steps and at each epoch end
    kill_and_resume("finetune", argv, root, lambda: Replacements(root / "ckpt" / "checkpoint.pt"), root / "metrics.json",
                    events=(0, 5), delay=0.15)

    reference, resumed = (json.loads((r / "metrics.json").read_text()) for r in (ref_root, root))
    assert without(resumed, "timing", "params") == without(reference, "timing", "params")
    assert sha256(root / "model" / "model.safetensors") == sha256(ref_root / "model" / "model.safetensors")
    assert temp_files(root) == []


# ----------------------------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def embed_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    from test_candidates import write_tiny_dataset

    from digiq import candidates as C

    root = tmp_path_factory.mktemp("embed-inputs")
    dataset = write_tiny_dataset(root / "raw", n_traj=4, steps=3)
    candidates = root / "candidates.parquet"
    C.write_candidates(C.make_candidates(dataset, 8, seed=0), candidates)
    return dataset.root, candidates, save_tiny_llava(root / "model")


def test_embed_killed_twice_resumes_to_the_same_tables(tmp_path, embed_inputs):
    dataset, candidates, model = embed_inputs

    def argv(root: Path) -> list[str]:
        section = {"models": {"finetuned": str(model)}, "candidates": str(candidates), "out": str(root / "emb"),
                   "parts": str(root / "parts"), "metrics": str(root / "metrics"), "dtype": "float32", "device": "cpu",
                   "chunk_states": 1, "variant": "finetuned"}
        root.mkdir()
        return ["embed", "--params", str(write_params(root / "params.yaml", {"collect": {"out": str(dataset)}, "embed": section}))]

    ref, root = tmp_path / "reference", tmp_path / "killed"
    run_stage(argv(ref), tmp_path / "reference.log")
    metrics = root / "metrics" / "embed-finetuned.json"
    # 12 states, one chunk file pair each
    points = kill_and_resume("embed", argv(root), root, lambda: Files(root / "parts" / "finetuned", "states-*.parquet"),
                             metrics, events=(0, 4), delay=0.2)

    assert tree_hashes(root / "emb") == tree_hashes(ref / "emb")
    timing = ("seconds", "load_seconds", "samples_per_s", "computed_samples", "screenshots_encoded", "resumed_chunks")
    reference = json.loads((ref / "metrics" / "embed-finetuned.json").read_text())
    resumed = json.loads(metrics.read_text())
    assert without(resumed, *timing) == without(reference, *timing)
    assert resumed["resumed_chunks"] == sum(p["seen"] for p in points)  # every chunk finished before a kill was kept
    assert not (root / "parts" / "finetuned").exists() and temp_files(root) == []


# ----------------------------------------------------------------------------------------------- critic

CRITIC = {"seed": 2, "critic": {"updates": 600, "hidden": [32], "batch_size": 32, "log_every": 20,
                                "checkpoint_every": 60, "device": "cpu", "inputs": {"q": ["vlm"], "v": ["vlm"]}}}


def test_critic_killed_twice_resumes_to_the_same_critic(tmp_path):
    project = feature_project(tmp_path / "project", n_states=60, k=8, dim=16, seed=1)
    params = write_project_params(project, **CRITIC)

    def argv(name: str) -> list[str]:
        out = project / name
        return ["critic", "--params", str(params), "--out", str(out / "critic"),
                "-S", f"critic.metrics={out / 'critic.json'}", "-S", f"critic.live_dir={out / 'dvclive'}"]

    run_stage(argv("reference"), tmp_path / "reference.log")
    root = project / "killed"
    root.mkdir()
    checkpoint = root / "critic.ckpt"
    # the default lr grid, 600 updates per rate: a checkpoint every 60 updates (at logged points), one file for the grid
    kill_and_resume("critic", argv("killed"), root, lambda: Replacements(checkpoint), root / "critic.json",
                    events=(0, 3), delay=0.3)

    ref = project / "reference"
    reference, resumed = (json.loads((r / "critic.json").read_text()) for r in (ref, root))
    assert without(resumed, "timings_s") == without(reference, "timings_s")
    assert tree_hashes(root / "critic") == tree_hashes(ref / "critic")  # weights, config, step and candidate scores
    assert not checkpoint.exists() and temp_files(root) == []


# ----------------------------------------------------------------------------------------------- evaluate


@pytest.mark.browser
def test_evaluate_killed_twice_resumes_to_the_same_results(tmp_path):
    def argv(root: Path) -> list[str]:
        section = {"methods": ["behavior", "random"], "tasks": ["click-button"], "episodes_per_task": 2,
                   "episodes_per_unit": 1, "max_steps": 4, "workers": 2, "shards": str(root / "shards"),
                   "out": str(root / "eval.json"), "plots": str(root / "eval.csv")}
        root.mkdir()
        settings = {"evaluate": section, "candidates": {"k": 4}}
        return ["evaluate", "--no-progress", "--params", str(write_params(root / "params.yaml", settings))]

    ref, root = tmp_path / "reference", tmp_path / "killed"
    run_stage(argv(ref), tmp_path / "reference.log")
    # 2 methods × 2 episodes, one shard each
    points = kill_and_resume("evaluate", argv(root), root, lambda: Files(root / "shards", "*/*.json"),
                             root / "eval.json", events=(0, 1), delay=0.5)
    assert wait_for_no_browsers() == []

    reference, resumed = (json.loads((r / "eval.json").read_text()) for r in (ref, root))
    assert resumed["protocols"] == reference["protocols"]
    assert (root / "eval.csv").read_bytes() == (ref / "eval.csv").read_bytes()
    shards = {p.relative_to(ref / "shards"): json.loads(p.read_text())["episodes"] for p in (ref / "shards").rglob("*.json")}
    assert {p.relative_to(root / "shards"): json.loads(p.read_text())["episodes"]
            for p in (root / "shards").rglob("*.json")} == shards
    assert sum(p["seen"] for p in points) < len(shards) and temp_files(root) == []
