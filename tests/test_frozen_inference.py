"""Frozen inference at the CPU's limit: the packed last-token decoder (digiq/vlm/packed.py) computes what the whole
model computes, with fewer FLOPs; int8 quantization is chosen by the documented rules, deterministic and close."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_llava import save_tiny_llava
from torch.utils.flop_counter import FlopCounterMode

from digiq.errors import DigiqError
from digiq.runtime import ComputeDtype, Quantization, cpu_flags, resolve_quantize
from digiq.schema import Action
from digiq.vlm import prompts as P
from digiq.vlm.load import load_vlm

GOAL = "log in as bob"
OBS = 'Previous Actions: tap (y=0.10, x=0.20) on "Username"; type "bob"\nGoal: log in as bob'
ACTIONS = [Action.tap(0.5, 0.3), Action.type_text("hello there"), Action.simple("PRESS_ENTER"),
           Action.swipe((0.8, 0.5), (0.2, 0.5)), Action.tap(0.05, 0.9)]


def save_gqa_llava(path):
    """A tiny LLaVA whose Llama has grouped-query attention (4 query heads, 2 key/value heads), 3 layers."""
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    save_tiny_llava(path)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    text = LlamaConfig(**{**model.config.text_config.to_dict(), "num_attention_heads": 4, "num_key_value_heads": 2,
                          "hidden_size": 32, "head_dim": 8})
    config = model.config
    config.text_config = text
    torch.manual_seed(1)
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["mha", "gqa"])
def vlm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    (save_tiny_llava if request.param == "mha" else save_gqa_llava)(folder)
    return load_vlm(folder, dtype="float32", device="cpu")


def image(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8))


def test_packed_rows_equal_the_whole_models_hidden_states(vlm):
    assert vlm._packed is not None
    img = image()
    tokens = vlm.encode_images([img])
    prompts = P.build_prompts(GOAL, OBS, ACTIONS)  # rows of different lengths after a shared prefix
    layers = list(range(vlm.num_layers + 1))
    with torch.no_grad():
        whole = vlm.forward(tokens, prompts, ACTIONS, layers=layers, image_sizes=[img.size], truncate=False)
        for k in layers:  # the candidates of one state: shared prefix, packed suffixes, the read layer's last token
            packed = vlm.forward_features(tokens, prompts, ACTIONS, layer=k, image_sizes=[img.size], batch_size=3)
            torch.testing.assert_close(packed, whole.features[k], rtol=0, atol=1e-5)
        # states of different screenshots and lengths: no prefix, one packed row each
        many = vlm.encode_images([image(1), image(2), image(3)])
        states = [P.state_prompt(GOAL, OBS), P.state_prompt("x", ""), P.state_prompt(GOAL * 3, OBS)]
        whole = vlm.forward(many, states, layers=layers, truncate=False)
        packed = vlm.forward(many, states, layers=layers)
    for k in layers:
        torch.testing.assert_close(packed.features[k], whole.features[k], rtol=0, atol=1e-5)


def test_packed_rows_do_fewer_flops_than_the_padded_truncated_path(vlm):
    img = image()
    tokens = vlm.encode_images([img])
    prompts = P.build_prompts(GOAL, OBS, ACTIONS)
    counts = {}
    with torch.no_grad():
        for name in ("packed", "padded"):
            saved, vlm._packed = vlm._packed, (vlm._packed if name == "packed" else None)
            try:
                with FlopCounterMode(display=False) as counter:
                    out = vlm.forward_features(tokens, prompts, ACTIONS, layer=2, image_sizes=[img.size])
            finally:
                vlm._packed = saved
            counts[name] = (counter.get_total_flops(), out)
    torch.testing.assert_close(counts["packed"][1], counts["padded"][1], rtol=0, atol=1e-5)
    assert counts["packed"][0] < 0.75 * counts["padded"][0]


def test_mean_pooling_keeps_the_hugging_face_path(vlm):
    img = image()
    tokens = vlm.encode_images([img])
    prompts = P.build_prompts(GOAL, OBS, ACTIONS[:2])
    with torch.no_grad():
        mean = vlm.forward_features(tokens, prompts, ACTIONS[:2], layer=2, pooling="mean", image_sizes=[img.size])
        whole = vlm.forward(tokens, prompts, ACTIONS[:2], layers=[2], pooling="mean", image_sizes=[img.size],
                            truncate=False)
    torch.testing.assert_close(mean, whole.features[2], rtol=0, atol=1e-5)


FP32_AUTO = ComputeDtype("float32", "auto: cpu has no bf16 instructions (amx_bf16, avx512_bf16)")


def test_quantize_rules(monkeypatch):
    monkeypatch.delenv("DIGIQ_QUANTIZE", raising=False)
    bf16 = ComputeDtype("bfloat16", "auto: cpu has avx512_bf16")
    assert resolve_quantize("auto", bf16, "cpu") == Quantization("none", "auto: the compute dtype is bfloat16 "
                                                                        "(auto: cpu has avx512_bf16)")
    named = ComputeDtype("float32", "embed.dtype: float32")
    assert resolve_quantize("auto", named, "cpu").name == "none"  # a setting naming float32 gets float32
    assert resolve_quantize("int8", named, "cpu", setting="embed.quantize") == Quantization("int8", "embed.quantize: int8")
    forced = ComputeDtype("float32", "DIGIQ_DTYPE=float32")
    expected = "int8" if "avx2" in cpu_flags() else "none"
    assert resolve_quantize("auto", forced, "cpu").name == expected
    assert resolve_quantize("auto", FP32_AUTO, "cpu").name == expected
    assert resolve_quantize("auto", FP32_AUTO, "cuda").name == "none"
    monkeypatch.setenv("DIGIQ_QUANTIZE", "none")
    assert resolve_quantize("auto", FP32_AUTO, "cpu") == Quantization("none", "DIGIQ_QUANTIZE=none")
    assert resolve_quantize("int8", FP32_AUTO, "cpu").name == "int8"  # the setting wins over the variable
    monkeypatch.setenv("DIGIQ_QUANTIZE", "int4")
    with pytest.raises(DigiqError, match="DIGIQ_QUANTIZE: expected auto, none or int8, got 'int4'"):
        resolve_quantize("auto", FP32_AUTO, "cpu")
    with pytest.raises(DigiqError, match="embed.quantize: int8 runs float32 activations on the CPU"):
        resolve_quantize("int8", bf16, "cpu", setting="embed.quantize")


def test_int8_quantizes_the_language_model_only_deterministically_and_closely(tmp_path, monkeypatch):
    from digiq.extractor import build_extractor

    folder = save_tiny_llava(tmp_path / "tiny")
    monkeypatch.setenv("DIGIQ_DTYPE", "float32")
    monkeypatch.setenv("DIGIQ_QUANTIZE", "int8")
    runs = []
    for _ in range(2):
        extractor, _, precision = build_extractor("finetuned", folder, layer=2, pooling="last", device="cpu")
        assert precision == "float32+int8"
        assert extractor.quantization == Quantization("int8", "DIGIQ_QUANTIZE=int8")
        img = image()
        tokens = extractor.encode([img])
        runs.append(extractor.candidates(tokens, img.size, GOAL, OBS, ACTIONS))
    assert (runs[0] == runs[1]).all()  # same inputs, same batches: the same int8 features
    modules = dict(extractor.vlm.model.named_modules())
    q_projs = [m for n, m in modules.items() if "language_model" in n and n.endswith("q_proj")]
    assert q_projs and all(type(m).__module__.startswith("torch.ao.nn.quantized") for m in q_projs)
    kept = [m for n, m in modules.items() if "vision_tower" in n or "multi_modal_projector" in n]
    assert any(type(m) is torch.nn.Linear for m in kept) and not any("quantized" in type(m).__module__ for m in kept)
    monkeypatch.setenv("DIGIQ_QUANTIZE", "none")
    plain, _, precision = build_extractor("finetuned", folder, layer=2, pooling="last", device="cpu")
    assert precision == "float32"
    fp32 = plain.candidates(plain.encode([img]), img.size, GOAL, OBS, ACTIONS)
    cos = (runs[0] * fp32).sum(1) / (np.linalg.norm(runs[0], axis=1) * np.linalg.norm(fp32, axis=1))
    assert cos.min() > 0.95 and not (runs[0] == fp32).all()
    monkeypatch.setenv("DIGIQ_QUANTIZE", "int8")
    vision, _, precision = build_extractor("no_vlm", folder, layer=2, pooling="last", device="cpu")
    assert precision == "float32" and vision.quantization.reason == "no_vlm runs no language model"


def test_live_evaluation_follows_the_embed_stages_quantize_setting(tmp_path, monkeypatch):
    """The live featurizer is built from the embed section, quantize included: a setting that names int8 or none is
    what live features run, whatever $DIGIQ_QUANTIZE says (as in the embed stage)."""
    from digiq.config import Params
    from digiq.eval_runner import live_features
    from digiq.live_features import LiveFeaturizer

    folder = save_tiny_llava(tmp_path / "tiny")
    monkeypatch.setenv("DIGIQ_DTYPE", "float32")
    monkeypatch.setenv("DIGIQ_QUANTIZE", "none")
    for quantize, precision in (("int8", "float32+int8"), ("none", "float32")):
        recipe = live_features(Params(embed={"quantize": quantize, "models": {"finetuned": str(folder)}, "device": "cpu"}))
        assert recipe["quantize"] == quantize
        live = LiveFeaturizer(**{**recipe, "channels": None})
        assert live.extractor.quantization.name == quantize and precision in live.recipe


def test_the_embed_stage_records_its_quantization_and_keeps_int8_parts_apart(tmp_path, monkeypatch):
    import json

    from test_candidates import write_tiny_dataset

    from digiq import candidates as C
    from digiq.config import EmbedParams, Params
    from digiq.pipelines import embed as stage

    dataset = write_tiny_dataset(tmp_path / "raw")
    cand_path = tmp_path / "candidates.parquet"
    C.write_candidates(C.make_candidates(dataset, 4, seed=0), cand_path)
    model = str(save_tiny_llava(tmp_path / "model"))
    monkeypatch.setenv("DIGIQ_DTYPE", "float32")  # the machine's float32: auto picks int8 on an x86 CPU with AVX2
    outcomes = {}
    for quantize in ("int8", "none"):
        p = EmbedParams(models={"finetuned": model, "off_the_shelf": model, "no_vlm": model}, candidates=str(cand_path),
                        out=str(tmp_path / quantize / "emb"), parts=str(tmp_path / quantize / "parts"),
                        metrics=str(tmp_path / quantize / "metrics"), device="cpu", chunk_states=4, quantize=quantize)
        outcomes[quantize] = stage.run(Params(collect={"out": str(tmp_path / "raw")}, embed=p))
    m = outcomes["int8"].metrics
    assert (m["dtype"], m["dtype_reason"], m["quantize"], m["quantize_reason"]) == (
        "float32", "DIGIQ_DTYPE=float32", "int8", "embed.quantize: int8")
    assert outcomes["none"].metrics["quantize"] == "none"
    manifests = {q: json.loads((o.out / "embedding.json").read_text()) for q, o in outcomes.items()}
    assert manifests["int8"]["quantize"] == "int8" and "quantize" not in manifests["none"]
    saved = json.loads((tmp_path / "int8" / "metrics" / "embed-finetuned.json").read_text())
    assert saved["quantize_reason"] == "embed.quantize: int8"


def test_int8_features_do_not_depend_on_the_other_states_of_a_chunk_nor_on_duplicates(tmp_path, monkeypatch):
    from digiq.extractor import build_extractor

    folder = save_tiny_llava(tmp_path / "tiny")
    monkeypatch.setenv("DIGIQ_DTYPE", "float32")
    monkeypatch.setenv("DIGIQ_QUANTIZE", "int8")
    extractor, _, _ = build_extractor("finetuned", folder, layer=2, pooling="last", device="cpu")
    tokens = extractor.encode([image(1), image(2), image(3)])
    goals, observations = [GOAL, "x", GOAL * 3], [OBS, "", OBS]
    chunk = extractor.states(tokens, goals, observations)
    alone = [extractor.states(tokens[i:i + 1], goals[i:i + 1], observations[i:i + 1])[0] for i in range(3)]
    assert (chunk == np.stack(alone)).all()  # the embed job's chunk and live featurization's single state agree
    img = image(1)
    distinct = extractor.candidates(tokens[:1], img.size, GOAL, OBS, ACTIONS)
    repeated = extractor.candidates(tokens[:1], img.size, GOAL, OBS, ACTIONS + ACTIONS[::-1])  # live K, duplicates
    assert (repeated[:len(ACTIONS)] == distinct).all() and (repeated[len(ACTIONS):] == distinct[::-1]).all()
