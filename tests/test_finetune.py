"""Representation fine-tuning with real components: a tiny LLaVA checkpoint, a real PNG dataset, peft, DVCLive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_llava import save_tiny_llava, set_config

from digiq import finetune as F
from digiq.config import FinetuneParams, Params
from digiq.errors import DigiqError
from digiq.labels import write_labels
from digiq.finetune_job import run_fingerprint
from digiq.finetune_trainer import CHECKPOINT_FILE
from digiq.pipelines import finetune as stage
from digiq.schema import Action, Step, Trajectory
from digiq.store import Dataset, DatasetWriter
from digiq.vlm.load import load_vlm
from digiq.vlm.prompts import ORDER_KEY, TARGET_KEY, PageReading

N_TRAJ, N_STEPS = 8, 4
ELEMENTS = json.dumps([{"ref": 1, "tag": "button", "text": "Top", "bbox": [0.0, 0.0, 0.5, 1.0]}])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5-shaped checkpoint (CLIP vision, Llama text) with the default model's tokenizer, prompted
    state text first (the non-default order, which the fine-tuned model must inherit)."""
    path = save_tiny_llava(tmp_path_factory.mktemp("tiny-base"), text_layers=2)
    set_config(path, **{ORDER_KEY: "state_first"})
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """N_TRAJ trajectories of taps (label Yes when the tap is in the top half) and typing (No), real PNGs."""
    root = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(0)
    writer = DatasetWriter(root, gamma=0.95, source="test")
    trajs, labels = [], []
    for t in range(N_TRAJ):
        traj_id, steps = f"t{t:02d}", []
        for i in range(N_STEPS):
            shot, sha = writer.put_image(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8))
            nxt, nsha = writer.put_image(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8))
            action = Action.tap(float(rng.uniform(0.05, 0.95)), 0.5) if i % 2 == 0 else Action.type_text("abc")
            steps.append(Step(traj_id=traj_id, step_id=i, task="synthetic", goal="press the top button",
                              observation="", screenshot=shot, screenshot_sha256=sha, next_screenshot=nxt,
                              next_screenshot_sha256=nsha, action=action, reward=0.0, done=False,
                              elements=ELEMENTS))
            yes = action.kind == "tap" and action.touch_point[0] < 0.5
            labels.append({"traj_id": traj_id, "step_id": i, "action_kind": action.kind, "mse": 50.0 if yes else 0.0,
                           "label": "Yes" if yes else "No", "epsilon": 30.0, "scale": 0.25})
        trajs.append(Trajectory(traj_id=traj_id, task="synthetic", goal="press the top button", steps=steps))
    writer.write_shard("part-0", trajs)
    writer.finalize()
    labels_path = root.parent / "labels.parquet"
    write_labels(pd.DataFrame(labels), labels_path)
    return root, labels_path


def params(tmp: Path, **kw) -> FinetuneParams:
    defaults = dict(lora_r=4, lora_alpha=8, epochs=2, batch_size=4, val_fraction=0.25, lr=5e-3, probe_layer=1,
                    checkpoint_every=2, dtype="float32", out=str(tmp / "model"), metrics=str(tmp / "metrics.json"),
                    live_dir=str(tmp / "live"), checkpoint_dir=str(tmp / "ckpt"))
    return FinetuneParams(**{**defaults, **kw})


def run(dataset: Path, labels: Path, base: Path, p: FinetuneParams, **kw) -> dict | None:
    """The stage on these inputs with these finetune settings."""
    return stage.run(Params(collect={"out": str(dataset)}, label={"out": str(labels)}, model={"base": str(base)},
                            finetune=p), **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base, data) -> tuple[FinetuneParams, dict]:
    p = params(tmp_path_factory.mktemp("run"))
    return p, run(*data, base, p)


def test_examples_name_the_tapped_control_when_asked(data):
    ds = Dataset(data[0])
    labels = pd.read_parquet(data[1])
    plain = F.load_examples(ds, labels, data[1])
    named = F.load_examples(ds, labels, data[1], reading=PageReading(tap_target=True))
    for action, label, before, after in zip(named.actions, labels["label"], plain.prompts, named.prompts, strict=True):
        on_top = action.kind == "tap" and action.touch_point[0] <= 0.5  # the "Top" button's half of the page
        assert (') on "Top" (the spot' in after) == on_top and 'on "' not in before
        assert (after == before) == (not on_top)


def test_a_checkpoint_resumes_only_on_the_base_config_it_was_trained_from(base, tmp_path):
    """The base's config.json records how it is prompted (order, what it reads off the page): a base rebuilt in place
    with another reading must not resume the old run's checkpoint."""
    copy = shutil.copytree(base, tmp_path / "base")
    p = params(tmp_path)
    before = run_fingerprint(p, "data", copy)
    assert run_fingerprint(p, "data", copy) == before
    set_config(copy, **{TARGET_KEY: True})
    assert run_fingerprint(p, "data", copy) != before


def test_lora_targets_that_match_nothing_name_the_real_layers(base):
    spec = FinetuneParams(target_modules=r".*language_model\.encoder\..*\.(query|value)")
    with pytest.raises(DigiqError, match=r"matches no module; .* named .*q_proj") as err:
        F.make_trainable(load_vlm(base, dtype="float32", device="cpu"), spec)
    assert err.value.field == "target_modules"


def test_split_by_trajectory_is_disjoint_and_seeded():
    trajs = [f"t{i // 3}" for i in range(60)]
    train, val = F.split_by_trajectory(trajs, 0.2, seed=1)
    assert not {trajs[i] for i in train} & {trajs[i] for i in val}
    assert len(train) + len(val) == 60 and len({trajs[i] for i in val}) == 4
    again = F.split_by_trajectory(trajs, 0.2, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, F.split_by_trajectory(trajs, 0.2, seed=2)[1])


def test_class_weights_and_balanced_accuracy():
    y = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(F.class_weights(y), [4 / 6, 2.0])
    m = F.classification_metrics(y, np.array([0, 0, 0, 0]))
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == 0.5


def test_model_card_metadata_names_license_and_base_model(finished, base):
    from huggingface_hub import ModelCard

    card = ModelCard.load(Path(finished[0].out) / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.base_model == str(base) and "lora" in card.data.tags
    assert card.text.lstrip().startswith("# digiq fine-tuned VLM")


def test_run_writes_outputs_and_merged_equals_adapter(finished, base, data):
    p, metrics = finished
    out = Path(p.out)
    for name in ("config.json", "model.safetensors", "README.md", "adapter/adapter_config.json", "finetune.json"):
        assert (out / name).is_file(), name
    saved = json.loads(Path(p.metrics).read_text())
    assert saved["finetuned"] == metrics["finetuned"] and len(saved["history"]) == p.epochs
    # the final validation of a finished run is its last epoch's (same weights; not computed a second time)
    assert saved["finetuned"] == {k: v for k, v in saved["history"][-1].items() if k.startswith("val_")}
    assert {"val_balanced_accuracy", "layer"} <= saved["linear_probe"].keys()
    assert (Path(p.live_dir) / "metrics.json").is_file() and list((Path(p.live_dir) / "plots").rglob("*.tsv"))
    assert saved["data"]["sha256"] in (out / "README.md").read_text()
    assert saved["timing"]["dtype_reason"] == "finetune.dtype: float32"
    assert "finetune.dtype: float32" in (out / "README.md").read_text()
    assert not (Path(p.checkpoint_dir) / CHECKPOINT_FILE).exists()  # a finished run leaves no checkpoint

    merged = load_vlm(out, dtype="float32", device="cpu")
    adapted = load_vlm(base, dtype="float32", device="cpu", adapter=out / "adapter")
    plain = load_vlm(base, dtype="float32", device="cpu")
    assert merged.prompt_order == adapted.prompt_order == metrics["prompt_order"] == "state_first"
    ds = Dataset(data[0])
    ex = F.load_examples(ds, pd.read_parquet(data[1]), data[1], order=merged.prompt_order)
    assert ex.prompts[0].startswith("USER: Goal: press the top button\n<image>")
    rows = np.arange(8)
    logits = []
    for vlm in (merged, adapted, plain):
        tokens = vlm.encode_images([ds.load_image(*ex.images[i]) for i in ex.image[rows]])
        with torch.no_grad():
            logits.append(vlm.yes_no_logits(tokens, [ex.prompts[i] for i in rows], [ex.actions[i] for i in rows],
                                             image_sizes=[ex.sizes[i] for i in rows]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[0], logits[2], atol=1e-4)  # training changed the model


def test_resume_after_interruption_gives_the_same_metrics(finished, base, data, tmp_path):
    p_done, done = finished
    p = params(tmp_path)
    assert run(*data, base, p, stop_after_steps=3) is None  # "killed" after 3 steps: only the checkpoint exists
    assert (tmp_path / "ckpt" / CHECKPOINT_FILE).is_file() and not (tmp_path / "model").exists()
    resumed = run(*data, base, p)
    assert resumed["history"] == done["history"]
    assert resumed["finetuned"] == done["finetuned"]


def test_a_bf16_stored_base_trains_float32_lora_weights(base, data, tmp_path):
    """The 7B profile's memory layout (base_dtype bfloat16): frozen weights in bf16, what trains in fp32 (LoRA and the
    projector copy), bf16 autocast; the run finishes and its merged model loads and answers."""
    vlm = load_vlm(base, dtype="bfloat16", device="cpu")
    model = F.make_trainable(vlm, FinetuneParams(lora_r=4, lora_alpha=8))
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32} and any("multi_modal_projector" in n for n in trained)
    assert set(frozen.values()) == {torch.bfloat16}

    p = params(tmp_path, base_dtype="bfloat16", dtype="bfloat16", device="cpu", epochs=1)
    metrics = run(*data, base, p)
    assert metrics["completed"] and metrics["timing"]["device"] == "cpu" and metrics["timing"]["dtype"] == "bfloat16"
    assert np.isfinite(metrics["finetuned"]["val_loss"])
    merged = load_vlm(p.out, dtype="float32", device="cpu")
    assert merged.model.config.text_config.hidden_size == 32


def test_labels_naming_missing_steps_name_file_and_field(base, data, tmp_path):
    labels = pd.read_parquet(data[1])
    extra = labels.iloc[:1].assign(traj_id="nowhere")
    bad = tmp_path / "bad-labels.parquet"
    write_labels(pd.concat([labels, extra]), bad)
    with pytest.raises(DigiqError) as err:
        run(data[0], bad, base, params(tmp_path))
    assert err.value.file is not None and str(bad) in str(err.value) and "step_id" in str(err.value)
    assert "nowhere" in str(err.value) and not (tmp_path / "model").exists()


def test_the_stage_refuses_a_base_prompted_in_another_order(base, data, tmp_path):
    from typer.testing import CliRunner

    from digiq.cli.main import app
    from digiq.config import Params
    from digiq.params_file import params_yaml

    params_path = tmp_path / "params.yaml"
    params_path.write_text(params_yaml(Params(model={"base": str(base), "prompt_order": "image_first"})))
    result = CliRunner().invoke(app, ["finetune", "--params", str(params_path), "-S", f"collect.out='{data[0]}'",
                                      "-S", f"label.out='{data[1]}'", "--out", str(tmp_path / "model")])
    assert result.exit_code == 2, result.output
    assert f"{base}/config.json: {ORDER_KEY}: the checkpoint is prompted state_first but model.prompt_order is " \
           "image_first" in " ".join(result.output.split())
    assert not (tmp_path / "model").exists()
