"""`digiq embed` and `digiq finetune` data-parallel under `accelerate launch` (2 CPU processes, gloo), compared
with the plain one-process run on the same tiny model and data (docs/accelerate.md).

The launch is ``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=true``: in accelerate
1.15 ``accelerate launch --cpu --num_processes 2`` starts *one* process unless mpirun is given a hostfile
(huggingface/accelerate#2741); ``--multi_gpu`` is its torchrun launcher, which starts both processes on any machine,
and the processes join a gloo group on CPU (``digiq.parallel``). ``DIGIQ_TEST_LAUNCH=mpirun`` runs the same tests
through ``accelerate launch --cpu --num_processes 2 --mpirun_hostfile …`` (needs OpenMPI's mpirun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_candidates import write_tiny_dataset
from test_finetune import base, data  # noqa: F401 - module fixtures: the tiny LLaVA and the labelled dataset
from test_finetune import run as finetune
from tiny_llava import save_tiny_llava

from digiq import candidates as C
from digiq import embed as E
from digiq.config import EmbedParams, Params
from digiq.pipelines import embed as stage

pytestmark = pytest.mark.slow

COMMON = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def accelerate_launch(argv: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``accelerate launch … -m digiq.cli.main ARGV`` on 2 CPU processes; fails the test with its output.

    torchrun (``--multi_gpu``) by default; ``DIGIQ_TEST_LAUNCH=mpirun`` takes the ``--cpu`` route through
    OpenMPI's mpirun instead (Debian ``openmpi-bin``; not installed in CI)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    accelerate = accelerate if accelerate.is_file() else Path(shutil.which("accelerate") or "accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    if os.environ.get("DIGIQ_TEST_LAUNCH") == "mpirun":
        (cwd / "hostfile").write_text("localhost slots=2\n")
        launch = ["--cpu", *COMMON, "--mpirun_hostfile", str(cwd / "hostfile"), "--main_process_port", "29531"]
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    else:
        launch = ["--multi_gpu", *COMMON, "--main_process_port", "0"]
    done = subprocess.run([str(accelerate), "launch", *launch, "-m", "digiq.cli.main", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def write_params(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def test_embed_two_processes_equal_one(tmp_path, monkeypatch):
    """Sharded extraction merged by key: the tables are identical to the one-process run's, row for row, at the same
    threads per process (the packed rows' matmuls may round differently with another thread count)."""
    monkeypatch.setenv("DIGIQ_THREADS", "1")  # the one-process run and each launched process alike
    dataset = write_tiny_dataset(tmp_path / "raw", n_traj=4, steps=3)  # 12 states, 6 chunks of 2
    cands = tmp_path / "candidates.parquet"
    C.write_candidates(C.make_candidates(dataset, 8, seed=0), cands)
    model = save_tiny_llava(tmp_path / "model")
    def section(name: str) -> dict:
        return {"models": {"finetuned": str(model)}, "candidates": str(cands), "out": str(tmp_path / name / "emb"),
                "parts": str(tmp_path / name / "parts"), "metrics": str(tmp_path / name / "metrics"),
                "dtype": "float32", "device": "auto", "chunk_states": 2}

    started = time.perf_counter()
    stage.run(Params(collect={"out": str(dataset.root)}, embed=EmbedParams(**section("one"))))
    print(f"embed one process: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    params = write_params(tmp_path / "params.yaml", collect={"out": str(dataset.root)}, embed=section("two"))
    done = accelerate_launch(["embed", "--params", str(params)], tmp_path)
    print(f"embed two processes: {time.perf_counter() - started:.1f} s")
    assert done.stdout.count("wrote ") == 1, done.stdout  # only the main process reports (and writes)
    for table in (E.STATES_FILE, E.CANDIDATES_FILE):
        one = pq.read_table(tmp_path / "one" / "emb" / "finetuned" / table)
        two = pq.read_table(tmp_path / "two" / "emb" / "finetuned" / table)
        assert one.num_rows > 0 and two.equals(one), table  # bit-exact: every chunk is computed as in one process
    assert not (tmp_path / "two" / "parts" / "finetuned").exists()
    m1 = json.loads((tmp_path / "one" / "metrics" / "embed-finetuned.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics" / "embed-finetuned.json").read_text())
    assert m2["processes"] == 2 and "processes" not in m1
    assert (m2["chunks"], m2["computed_samples"], m2["screenshots_encoded"]) == (
        m1["chunks"], m1["computed_samples"], m1["screenshots_encoded"])


def test_finetune_two_processes_converge_to_the_same_metrics(tmp_path, base, data):  # noqa: F811 - fixtures
    """DDP over 2 processes takes the same optimizer steps as one process (each batch split in two, the loss
    scaled so that the averaged gradient is the whole batch's): metrics and weights agree to float rounding."""
    from safetensors.torch import load_file

    from digiq.config import FinetuneParams

    dataset, labels = data
    section = dict(lora_r=4, lora_alpha=8, epochs=2, batch_size=4, val_fraction=0.25, lr=5e-3, probe_layer=1,
                   checkpoint_every=2, dtype="float32")
    paths = {name: dict(out=str(tmp_path / name / "model"), metrics=str(tmp_path / name / "metrics.json"),
                        live_dir=str(tmp_path / name / "live"), checkpoint_dir=str(tmp_path / name / "ckpt"))
             for name in ("one", "two")}
    started = time.perf_counter()
    one = finetune(dataset, labels, base, FinetuneParams(**section, **paths["one"]))
    print(f"finetune one process: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    params = write_params(tmp_path / "params.yaml", collect={"out": str(dataset)}, label={"out": str(labels)},
                          model={"base": str(base)}, finetune={**section, **paths["two"]})
    done = accelerate_launch(["finetune", "--params", str(params)], tmp_path)
    print(f"finetune two processes: {time.perf_counter() - started:.1f} s")
    assert done.stdout.count("held-out balanced accuracy: fine-tuned") == 1, done.stdout  # only the main reports
    two = json.loads(Path(paths["two"]["metrics"]).read_text())
    assert two["timing"]["processes"] == 2 and two["completed"] and len(two["history"]) == 2
    assert two["data"] == one["data"]
    for key in ("val_accuracy", "val_balanced_accuracy"):  # predictions: identical on this validation split
        assert two["finetuned"][key] == one["finetuned"][key], key
        assert two["linear_probe"][key] == one["linear_probe"][key], key
    assert two["finetuned"]["val_loss"] == pytest.approx(one["finetuned"]["val_loss"], rel=1e-4, abs=1e-5)
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert h2["step"] == h1["step"]
        for key in ("train_loss", "val_loss"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-5), (h1, h2)
    diff = max(float((load_file(Path(paths[n]["out"]) / "adapter" / "adapter_model.safetensors")[k].float() - w)
                     .abs().max()) for n in ("two",)
               for k, w in load_file(Path(paths["one"]["out"]) / "adapter" / "adapter_model.safetensors").items())
    print(f"finetune: max |Δ adapter weight| = {diff:.2e}, val loss {one['finetuned']['val_loss']:.6f} vs "
          f"{two['finetuned']['val_loss']:.6f}")
    assert diff < 1e-4
    assert not list((tmp_path / "two").rglob("*.tmp*"))
