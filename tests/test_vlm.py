"""The VLM layer with real components: default build, loading, prompts, and the cached fast paths."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner
from tiny_llava import save_tiny_llava, set_config

from digiq.errors import DigiqError
from digiq.schema import Action, ActionType
from digiq.vlm import prompts as P
from digiq.vlm.inputs import draw_tap_marker, pad_to_square, patch_index, square_point
from digiq.vlm.load import load_vlm

OBS = 'Previous Actions: tap (y=0.10, x=0.20) on "Username"; type "bob"\nGoal: log in as bob'
GOAL = "log in as bob"
ACTIONS = [
    Action.tap(0.5, 0.3),
    Action.type_text("hello"),
    Action.simple("PRESS_ENTER"),
    Action.swipe((0.8, 0.5), (0.2, 0.5)),
    Action.simple("STATUS_TASK_COMPLETE"),
    Action.tap(0.05, 0.9),
]


def screenshot(seed: int = 0, size: tuple[int, int] = (160, 210)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        draw.rectangle([x0, y0, x0 + 20, y0 + 12], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIGIQ_CACHE", str(tmp_path_factory.mktemp("digiq-cache")))
        yield


@pytest.fixture(scope="module")
def base_path(cache, tmp_path_factory):
    from digiq.config import Params
    from digiq.pipelines.build_model import run

    out = tmp_path_factory.mktemp("models") / "base"
    record = run(Params(model={"base": str(out), "prompt_order": "image_first"}))
    assert record["config"]["image_size"] == 112
    return out


@pytest.fixture(scope="module")
def vlm(base_path):
    return load_vlm(base_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tokens(vlm):
    return vlm.encode_images([screenshot()])


@pytest.fixture(scope="module")
def minilm_path(cache, tmp_path_factory):
    """The embedded default with all-MiniLM-L6-v2's pretrained layers as its language model, reading the page (taps
    named, text fields quoted)."""
    from digiq.config import Params
    from digiq.pipelines.build_model import run

    out = tmp_path_factory.mktemp("models") / "base-minilm"
    record = run(Params(model={"base": str(out), "prompt_order": "image_first", "text_model": "minilm",
                               "tap_target": True, "field_values": True}))
    assert record["random"] == ["multi_modal_projector"]
    return out


@pytest.fixture(scope="module")
def minilm_vlm(minilm_path):
    return load_vlm(minilm_path, dtype="float32", device="cpu")


@pytest.fixture(params=["llama", "minilm"])
def any_vlm(request):
    """The default VLM with either language model (the fast paths must hold for both)."""
    return request.getfixturevalue("vlm" if request.param == "llama" else "minilm_vlm")


# ---------------------------------------------------------------- build / load
def test_default_build_is_deterministic_and_round_trips(base_path, vlm, tmp_path):
    from safetensors.torch import load_file

    from digiq.vlm.build import DefaultVLMConfig, build_default_model

    model, _, record = build_default_model(DefaultVLMConfig(image_size=112, seed=0))
    model.save_pretrained(tmp_path)
    assert _sha256(tmp_path / "model.safetensors") == _sha256(base_path / "model.safetensors"), \
        "a second build gave other weights"
    assert record["parameters"] == json.loads((base_path / "digiq_build.json").read_text())["parameters"]
    print(f"default VLM: {record['parameters']:,} parameters")

    # pretrained parts really are pretrained: MiniLM word embeddings, DINOv2 weights
    from digiq.vlm.build import minilm_dir

    minilm = load_file(str(minilm_dir() / "model.safetensors"))["embeddings.word_embeddings.weight"]
    assert torch.equal(model.get_input_embeddings().weight[: minilm.shape[0]], minilm)

    # save/load round trip: identical logits
    inputs = vlm.processor(images=[pad_to_square(screenshot(), vlm.pad_fill)],
                           text=[P.build_prompt(GOAL, OBS, ACTIONS[1], marker="none")], return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits
        b = vlm.model(**inputs).logits
    assert torch.equal(a, b)


def test_plain_transformers_loads_the_checkpoint(base_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(base_path), local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(str(base_path), local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    inputs = processor(images=[pad_to_square(screenshot())], text=["USER: <image>\nhello ASSISTANT:"], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 112, 112)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64


def test_model_card_metadata_names_license_and_pretrained_sources(base_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(base_path / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.base_model == ["facebook/dinov2-small", "sentence-transformers/all-MiniLM-L6-v2"]
    assert card.data.pipeline_tag == "image-text-to-text" and "digi-q" in card.data.tags
    assert card.text.lstrip().startswith("# digiq default VLM")


def test_bad_paths_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(DigiqError, match="no-such-model.*never downloads"):
        load_vlm(missing)
    with pytest.raises(DigiqError, match="config.json is missing"):
        load_vlm(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DigiqError, match=str(tmp_path)):
        load_vlm(tmp_path)
    with pytest.raises(DigiqError, match="llava-hf"):
        load_vlm("llava-hf/llava-1.5-7b-hf")  # a hub id is not a folder: never fetched


def test_cli_info(base_path):
    from digiq.cli.model import app

    result = CliRunner().invoke(app, ["info", str(base_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["architecture"] == "LlavaForConditionalGeneration" and info["image_seq_length"] == 64
    assert info["parameters"] == info["digiq_build"]["parameters"]
    bad = CliRunner().invoke(app, ["info", "/nonexistent/model"])
    assert bad.exit_code == 2 and "/nonexistent/model" in bad.output
    bad = CliRunner().invoke(app, ["build", "--out", "unused", "-S", "model.image_size=100"])
    assert bad.exit_code == 2 and "multiple of 14" in bad.output


# ---------------------------------------------------------------- fast paths
def test_cached_path_equals_full_model_path(any_vlm):
    vlm, img = any_vlm, screenshot()
    tokens = vlm.encode_images([img])
    for action in ACTIONS[:3]:
        prompt = P.build_prompt(GOAL, OBS, action, marker="none")
        with torch.no_grad():
            full = vlm.full_forward([img], [prompt])
            out = vlm.forward(tokens, [prompt], [action], layers=range(vlm.num_layers + 1), yes_no=True)
        for k in range(vlm.num_layers + 1):
            torch.testing.assert_close(out.features[k], full.hidden_states[k][:, -1].float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.yes_no, full.logits[:, -1, list(vlm.answer_ids)].float(), rtol=0, atol=1e-5)


def test_identical_inputs_identical_outputs(vlm, tokens):
    prompts = P.build_prompts(GOAL, OBS, ACTIONS, marker="patch")
    kw = dict(layers=[2], yes_no=True, image_sizes=[screenshot().size])
    with torch.no_grad():
        a, b = vlm.forward(tokens, prompts, ACTIONS, **kw), vlm.forward(tokens, prompts, ACTIONS, **kw)
        again = vlm.encode_images([screenshot()])
    assert torch.equal(a.features[2], b.features[2]) and torch.equal(a.yes_no, b.yes_no)
    assert torch.equal(again, tokens)


@pytest.mark.parametrize(("marker", "pooling"), [("patch", "last"), ("none", "mean")])
def test_prefix_cache_batching_and_truncation_agree(any_vlm, marker, pooling):
    vlm = any_vlm
    tokens = vlm.encode_images([screenshot()])
    prompts = P.build_prompts(GOAL, OBS, ACTIONS, marker=marker)
    kw = dict(layers=[0, 2, vlm.num_layers], pooling=pooling, image_sizes=[screenshot().size])
    with torch.no_grad():
        shared = vlm.forward(tokens, prompts, ACTIONS, yes_no=True, batch_size=4, **kw)
        plain = vlm.forward(tokens, prompts, ACTIONS, yes_no=True, prefix_cache=False, **kw)
        whole = vlm.forward(tokens, prompts, ACTIONS, truncate=False, **kw)
        alone = [vlm.forward(tokens, [p], [a], **kw) for p, a in zip(prompts, ACTIONS)]
        shallow = vlm.forward_features(tokens, prompts, ACTIONS, layer=2, pooling=pooling, image_sizes=[screenshot().size])
    for k in kw["layers"]:
        torch.testing.assert_close(shared.features[k], plain.features[k], rtol=0, atol=2e-5)
        torch.testing.assert_close(whole.features[k], plain.features[k], rtol=0, atol=2e-5)
        torch.testing.assert_close(torch.cat([o.features[k] for o in alone]), plain.features[k], rtol=0, atol=2e-5)
    torch.testing.assert_close(shallow, plain.features[2], rtol=0, atol=2e-5)
    torch.testing.assert_close(shared.yes_no, plain.yes_no, rtol=0, atol=2e-5)
    assert len({tuple(f.tolist()) for f in plain.features[2]}) == len(ACTIONS)  # the action matters


def test_tap_slot_takes_the_patch_under_the_point(vlm, tokens):
    size = screenshot().size  # 160 × 210: padded to 210², the point moves
    action = Action.tap(0.5, 0.3)
    row = vlm._row(P.build_prompt(GOAL, OBS, action), tokens, 0, action, [size])
    y, x = square_point(action.touch_point, size)
    assert (y, x) == pytest.approx((0.5, (0.3 * 160 + 25) / 210))
    expected = patch_index((y, x), 8)
    assert expected == 4 * 8 + 2
    assert torch.equal(row.sources[-1], tokens[0, expected])
    # the slot moves the features: two taps differing only in position give different features
    far = Action.tap(0.95, 0.95)
    prompts = [P.build_prompt(GOAL, OBS, a).replace(P.describe_action(a), "tap") for a in (action, far)]
    feats = vlm.forward_features(tokens, prompts, [action, far], layer=2, image_sizes=[size])
    assert not torch.allclose(feats[0], feats[1])
    with pytest.raises(DigiqError, match="image_sizes"):
        vlm.forward_features(tokens, prompts, [action, far], layer=2)


def test_candidate_features_draw_marker_path(vlm, tokens):
    img = screenshot()
    out = vlm.candidate_features(img, GOAL, OBS, ACTIONS[:3], layers=[2], marker="draw", yes_no=True)
    assert out.features[2].shape == (3, vlm.hidden_size) and out.yes_no.shape == (3, 2)
    fast = vlm.candidate_features(img, GOAL, OBS, ACTIONS[:3], layers=[2], image_tokens=tokens)
    assert fast.features[2].shape == (3, vlm.hidden_size)
    states = vlm.state_features([img, screenshot(1)], [GOAL, GOAL], [OBS, ""], layers=[-1], pooling="mean")
    assert states.features[vlm.num_layers].shape == (2, vlm.hidden_size)


def test_encode_equals_vision_features_then_projector(vlm, tokens):
    with torch.no_grad():
        two_step = vlm.project(vlm.vision_features([screenshot()]))
    assert torch.equal(two_step, tokens)
    assert tokens.shape == (1, 64, vlm.hidden_size)


def test_bf16_runs(base_path):
    vlm16 = load_vlm(base_path, dtype="bfloat16", device="cpu")
    tok = vlm16.encode_images([screenshot()])
    assert tok.dtype == torch.bfloat16
    feats = vlm16.forward_features(tok, P.build_prompts(GOAL, OBS, ACTIONS[:2]), ACTIONS[:2], layer=2,
                                   image_sizes=[screenshot().size])
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


@pytest.mark.parametrize(("text_model", "targets"), [("llama", r".*language_model.*\.(q_proj|v_proj)"),
                                                     ("minilm", r".*language_model\.encoder\..*\.(query|value)")])
def test_gradients_reach_lora_and_projector(request, text_model, targets):
    """Fine-tuning path: Yes/No logits through the prefix cache are differentiable (LoRA + projector)."""
    from peft import LoraConfig, get_peft_model

    from digiq.vlm.model import VLM

    path = request.getfixturevalue("base_path" if text_model == "llama" else "minilm_path")
    plain = load_vlm(path, dtype="float32", device="cpu")
    peft_model = get_peft_model(plain.model, LoraConfig(r=4, target_modules=targets,
                                                        modules_to_save=["multi_modal_projector"]))
    vlm = VLM(peft_model, plain.processor)
    vision = vlm.vision_features([screenshot()])
    prompts = P.build_prompts(GOAL, OBS, ACTIONS)
    grads = []
    for prefix_cache in (True, False):
        peft_model.zero_grad()
        tokens = vlm.project(vision)
        logits = vlm.yes_no_logits(tokens, prompts, ACTIONS, image_sizes=[screenshot().size], prefix_cache=prefix_cache)
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1] * 3)).backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None})
    assert any("lora_B" in n for n in grads[0]) and any("multi_modal_projector" in n for n in grads[0])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- prompt order
def test_prompt_order_travels_with_the_checkpoint(base_path, vlm, tokens, tmp_path):
    import shutil

    from digiq.vlm.build import DefaultVLMConfig, default_config

    assert json.loads((base_path / "config.json").read_text())[P.ORDER_KEY] == "image_first" == vlm.prompt_order
    assert getattr(default_config(DefaultVLMConfig(prompt_order="state_first"), 100, 99,
                                  {"pad": 0, "bos": 1, "eos": 2}), P.ORDER_KEY) == "state_first"
    with pytest.raises(DigiqError, match="prompt order"):
        default_config(DefaultVLMConfig(prompt_order="text_first"), 100, 99, {"pad": 0, "bos": 1, "eos": 2})

    state_first = tmp_path / "state-first"
    shutil.copytree(base_path, state_first)
    set_config(state_first, **{P.ORDER_KEY: "state_first"})
    sf = load_vlm(state_first, dtype="float32", device="cpu")
    assert sf.prompt_order == "state_first"
    prompts = P.build_prompts(GOAL, OBS, ACTIONS, order="state_first")
    assert prompts[0].startswith(f"USER: {OBS}\n{P.IMAGE}\nAction:")
    img = screenshot()
    with torch.no_grad():
        full = sf.full_forward([img], [P.build_prompt(GOAL, OBS, ACTIONS[1], marker="none", order="state_first")])
        ours = sf.candidate_features(img, GOAL, OBS, [ACTIONS[1]], marker="none", layers=[2], image_tokens=tokens)
        cached = sf.forward(tokens, prompts, ACTIONS, layers=[2], image_sizes=[img.size], batch_size=4)
        plain = sf.forward(tokens, prompts, ACTIONS, layers=[2], image_sizes=[img.size], prefix_cache=False)
        image_first = vlm.forward(tokens, P.build_prompts(GOAL, OBS, ACTIONS), ACTIONS, layers=[2],
                                  image_sizes=[img.size])
    torch.testing.assert_close(ours.features[2], full.hidden_states[2][:, -1].float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(cached.features[2], plain.features[2], rtol=0, atol=2e-5)
    assert not torch.allclose(cached.features[2], image_first.features[2], atol=1e-3)

    set_config(state_first, **{P.ORDER_KEY: "text_first"})
    with pytest.raises(DigiqError, match=P.ORDER_KEY) as err:
        load_vlm(state_first, dtype="float32", device="cpu")
    assert "config.json" in str(err.value)


# ---------------------------------------------------------------- pretrained MiniLM layers, named tap targets
def test_minilm_build_carries_the_pretrained_layers(minilm_path, minilm_vlm, tmp_path):
    from safetensors.torch import load_file

    from digiq.vlm.build import DefaultVLMConfig, build_default_model, minilm_dir

    model, _, record = build_default_model(DefaultVLMConfig(image_size=112, seed=0, text_model="minilm",
                                                            tap_target=True, field_values=True))
    model.save_pretrained(tmp_path)
    assert _sha256(tmp_path / "model.safetensors") == _sha256(minilm_path / "model.safetensors")
    assert record["config"]["text_model"] == "minilm"
    minilm = load_file(str(minilm_dir() / "model.safetensors"))
    lm = minilm_vlm.model.model.language_model
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.weight",
                 "embeddings.position_embeddings.weight", "embeddings.LayerNorm.weight"):
        assert torch.equal(lm.state_dict()[name], minilm[name]), name
    words = minilm["embeddings.word_embeddings.weight"]
    assert torch.equal(minilm_vlm.model.get_output_embeddings().weight[: words.shape[0]], words)
    assert minilm_vlm.num_layers == 6 and lm.config.is_decoder
    assert minilm_vlm.reading == P.PageReading(tap_target=True, field_values=True)
    minilm_vlm.model.save_pretrained(tmp_path / "again")  # as finetune saves its merged model: nothing goes missing
    assert load_file(str(tmp_path / "again" / "model.safetensors")).keys() == \
        load_file(str(minilm_path / "model.safetensors")).keys()
    config = json.loads((minilm_path / "config.json").read_text())
    assert config[P.TARGET_KEY] is True and config[P.FIELDS_KEY] is True


def test_default_build_records_no_later_options(base_path, vlm):
    """The default checkpoint stays byte-identical to earlier builds: no new keys in its config or build record."""
    assert not {P.TARGET_KEY, P.FIELDS_KEY} & json.loads((base_path / "config.json").read_text()).keys()
    assert vlm.reading == P.PageReading()
    assert not {"text_model", "tap_target", "field_values"} & \
        json.loads((base_path / "digiq_build.json").read_text())["config"].keys()


def test_unknown_text_model_is_one_clear_error():
    from digiq.vlm.build import DefaultVLMConfig, default_config

    with pytest.raises(DigiqError, match="unknown text model 'gpt'") as err:
        default_config(DefaultVLMConfig(text_model="gpt"), 100, 99, {"pad": 0, "bos": 1, "eos": 2})
    assert err.value.field == "text_model"


def test_named_targets_enter_the_prompt_only_when_the_checkpoint_asks(vlm, minilm_vlm):
    from digiq.envs.behavior import tap_target

    elements = [{"ref": 1, "tag": "button", "text": "Submit", "bbox": [0.4, 0.2, 0.6, 0.4]},
                {"ref": 2, "tag": "input_text", "text": "", "id": "user", "bbox": [0.1, 0.1, 0.2, 0.9]}]
    actions = [Action.tap(0.5, 0.3), Action.tap(0.15, 0.5), Action.tap(0.9, 0.9), Action.type_text("Submit")]
    assert [tap_target(a, elements) for a in actions] == ["Submit", "input_text#user", None, None]
    assert tap_target(actions[0], None) is None
    assert vlm.reading.targets(actions, elements) is None
    assert minilm_vlm.reading.targets(actions, elements) == ["Submit", "input_text#user", None, None]

    from digiq.extractor import VLMExtractor

    img = screenshot()
    extractor = VLMExtractor(minilm_vlm, layer=2)
    tokens = extractor.encode([img])
    named = extractor.candidates(tokens, img.size, GOAL, OBS, actions, elements)
    observed = minilm_vlm.reading.observation(OBS, elements)  # this checkpoint also quotes the (empty) text field
    direct = {}
    for kind, targets in (("named", minilm_vlm.reading.targets(actions, elements)), ("unnamed", None)):
        prompts = P.build_prompts(GOAL, observed, actions, targets, order=minilm_vlm.prompt_order)
        with torch.no_grad():
            direct[kind] = minilm_vlm.forward_features(tokens, prompts, actions, layer=2, image_sizes=[img.size]).numpy()
        if targets:
            assert 'Action: tap (y=0.50, x=0.30) on "Submit"' in prompts[0]
            assert 'on "' not in prompts[2].split("Action:")[1]
    np.testing.assert_allclose(named, direct["named"], rtol=0, atol=1e-5)
    assert not np.allclose(named[0], direct["unnamed"][0], atol=1e-3)  # naming the control changes f(s, a) of a tap on it
    np.testing.assert_allclose(named[2:], direct["unnamed"][2:], rtol=0, atol=1e-5)  # nothing to name: the same


def test_field_values_enter_the_state_text_only_when_the_checkpoint_asks(vlm, minilm_vlm):
    from digiq.extractor import VLMExtractor
    from digiq.envs.behavior import field_values

    filled = [{"ref": 1, "tag": "input_text", "text": "", "id": "user", "value": "bob", "bbox": [0.1, 0.1, 0.2, 0.9]},
              {"ref": 2, "tag": "input_password", "text": "", "id": "pw", "value": "", "bbox": [0.3, 0.1, 0.4, 0.9]},
              {"ref": 3, "tag": "button", "text": "Login", "bbox": [0.5, 0.1, 0.6, 0.4]}]
    emptied = [{**e, "value": ""} for e in filled]
    line = 'Text fields: input_text#user holds "bob", input_password#pw is empty.'
    assert field_values(filled) == line and field_values(filled[2:]) is None and field_values(None) is None
    reading = P.PageReading(field_values=True)
    assert reading.observation(OBS, filled) == f"{OBS}\n{line}" and reading.observation(OBS, filled[2:]) == OBS
    assert P.PageReading().observation(OBS, filled) == OBS

    img = screenshot()
    reads, blind = VLMExtractor(minilm_vlm, layer=2), VLMExtractor(vlm, layer=2)
    tokens = reads.encode([img])
    f_s = reads.states(tokens.repeat(2, 1, 1), [GOAL] * 2, [OBS] * 2, [filled, emptied])
    with torch.no_grad():
        direct = minilm_vlm.forward_features(tokens, [P.state_prompt(GOAL, f"{OBS}\n{line}", minilm_vlm.prompt_order)],
                                             layer=2)
    np.testing.assert_allclose(f_s[:1], direct.numpy(), rtol=0, atol=1e-5)
    assert not np.allclose(f_s[0], f_s[1], atol=1e-3)  # what was typed changes f(s)
    action = [Action.simple(ActionType.PRESS_ENTER)]
    assert not np.allclose(reads.candidates(tokens, img.size, GOAL, OBS, action, filled),
                           reads.candidates(tokens, img.size, GOAL, OBS, action, emptied), atol=1e-3)
    tokens = blind.encode([img])
    both = blind.states(tokens.repeat(2, 1, 1), [GOAL] * 2, [OBS] * 2, [filled, emptied])
    np.testing.assert_allclose(both, blind.states(tokens, [GOAL], [OBS]).repeat(2, 0), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- any LLaVA-style checkpoint
def test_tiny_llava_checkpoint_loads_and_matches(tmp_path):
    """A LLaVA-1.5-shaped model (CLIP vision, feature layer -2, centre-cropping processor), saved and loaded."""
    save_tiny_llava(tmp_path)

    tiny = load_vlm(tmp_path, dtype="float32", device="cpu")
    img = screenshot(3, (120, 200))
    tok = tiny.encode_images([img])
    assert tok.shape == (1, 16, 32)  # 4×4 patches, CLS dropped
    prompt = P.build_prompt(GOAL, OBS, ACTIONS[1], marker="none")
    with torch.no_grad():
        full = tiny.full_forward([img], [prompt])
        ours = tiny.forward(tok, [prompt], [ACTIONS[1]], layers=[1, 3], yes_no=True)
    torch.testing.assert_close(ours.features[1], full.hidden_states[1][:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.yes_no, full.logits[:, -1, list(tiny.answer_ids)], rtol=0, atol=1e-5)
    # its own patch grid for the tap slot (4×4 here, 24×24 for llava-1.5-7b)
    feats = tiny.forward_features(tok, P.build_prompts(GOAL, OBS, ACTIONS), ACTIONS, layer=2, image_sizes=[img.size])
    assert feats.shape == (len(ACTIONS), 32)


# ---------------------------------------------------------------- prompts and images
def test_prompts_per_action_type():
    for action in ACTIONS + [Action.simple("PRESS_BACK")]:
        prompt = P.build_prompt(GOAL, OBS, action)
        assert prompt.count(P.IMAGE) == 1 and prompt.endswith("ASSISTANT:")
        assert "Answer Yes or No." in prompt and P.describe_action(action) in prompt
        assert prompt.count(P.TAP_SLOT) == {"tap": 1, "swipe": 2}.get(action.kind, 0)
        assert P.TAP_SLOT not in P.build_prompt(GOAL, OBS, action, marker="none")
    assert P.build_prompt(GOAL, OBS, ACTIONS[0]).count(GOAL) == 1  # the observation already names the goal
    assert "Goal: open mail" in P.build_prompt("open mail", "Previous Actions: </s>", ACTIONS[0])
    prefix = P.build_prompt(GOAL, OBS, ACTIONS[0]).split("Action:")[0]
    assert all(p.startswith(prefix) for p in P.build_prompts(GOAL, OBS, ACTIONS))


def test_pad_to_square_and_marker():
    img = screenshot(size=(160, 210))
    square = pad_to_square(img, (1, 2, 3))
    assert square.size == (210, 210) and square.getpixel((0, 0)) == (1, 2, 3)
    # a pixel of the original lands where square_point says
    y, x = square_point((100 / 210, 40 / 160), img.size)
    assert square.getpixel((round(x * 210), round(y * 210))) == img.getpixel((40, 100))
    marked = draw_tap_marker(img, Action.tap(0.5, 0.5))
    assert marked.getpixel((80, 105)) == (255, 0, 0) and img.getpixel((80, 105)) != (255, 0, 0)
    assert draw_tap_marker(img, ACTIONS[1]).tobytes() == img.tobytes()


def test_auto_dtype_follows_the_hardware_then_the_environment_then_the_setting(monkeypatch):
    from digiq import runtime
    from digiq.runtime import ComputeDtype, resolve_dtype

    monkeypatch.delenv(runtime.DTYPE_ENV, raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    assert resolve_dtype("auto", "cpu").name == "float32" and runtime.choose_dtype("cpu") == torch.float32
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "amx_bf16", "avx512_bf16"})
    assert resolve_dtype("auto", "cpu") == ComputeDtype("bfloat16", "auto: cpu has amx_bf16 and avx512_bf16")
    monkeypatch.setenv(runtime.DTYPE_ENV, "float32")
    assert resolve_dtype("auto", "cpu") == ComputeDtype("float32", "DIGIQ_DTYPE=float32")
    assert resolve_dtype("bf16", "cpu", setting="embed.dtype") == ComputeDtype("bfloat16", "embed.dtype: bfloat16")
    monkeypatch.setenv(runtime.DTYPE_ENV, "float16")
    with pytest.raises(DigiqError, match="DIGIQ_DTYPE: expected float32 or bfloat16, got 'float16'"):
        resolve_dtype("auto", "cpu")
    assert runtime.dtype_from_name("bf16") == torch.bfloat16
    with pytest.raises(ValueError):
        runtime.dtype_from_name("int3")


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
