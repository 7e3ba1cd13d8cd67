"""The official critic's extra input channels: the sentence encoder, action strings, composition, the channels stage
and the channel feature views (digiq/channels.py, digiq/text_encoder.py, digiq/channel_tables.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import command_app, copy_feature_repo, feature_project, project_params, write_params, write_synthetic_sources
from digiq import feature_contract as fc
from digiq.channels import ORDER, STATE_CHANNELS, Inputs, action_strings, compose, input_dims
from digiq.cli import channels as channels_cli
from digiq.errors import DigiqError
from digiq.schema import Action, ActionType
from tiny_llava import save_tiny_llava

BUTTON = {"ref": 3, "parent": 1, "tag": "button", "text": "Submit", "value": None, "id": "subbtn", "classes": "",
          "bbox": [0.4, 0.2, 0.6, 0.8], "focused": False, "tampered": False, "leaf": True}
FIELD = {"ref": 2, "parent": 1, "tag": "input_text", "text": "", "value": "", "id": "tt", "classes": "",
         "bbox": [0.1, 0.2, 0.2, 0.8], "focused": False, "tampered": False, "leaf": True}


# ----------------------------------------------------------------------------- Inputs

def test_inputs_default_canonical_order_and_validation():
    assert Inputs().q == ["vlm", "image", "goal", "prev_action", "fields", "action"]
    assert Inputs().v == ["image", "goal", "prev_action", "fields"]
    assert Inputs(q=["action", "goal", "vlm"], v=["goal", "vlm"]).q == ["vlm", "goal", "action"]
    for bad, match in ((dict(v=["action"]), "Q channel"), (dict(q=["pixels"]), "unknown"), (dict(q=[]), "at least one"),
                       (dict(v=["goal", "goal"]), "twice")):
        with pytest.raises(ValueError, match=match):
            Inputs(**bad)


# ----------------------------------------------------------------------------- action strings

def test_action_strings_name_the_tapped_control_the_typed_text_and_the_kind():
    assert action_strings(Action.tap(0.5, 0.5), [FIELD, BUTTON]) == ("tap", "Submit")
    assert action_strings(Action.tap(0.15, 0.5), [FIELD, BUTTON]) == ("tap", "input_text#tt")  # no text: tag#id
    assert action_strings(Action.tap(0.9, 0.9), [FIELD, BUTTON]) == ("tap", "")  # off every control
    assert action_strings(Action.tap(0.5, 0.5), None) == ("tap", "")  # elements unknown
    assert action_strings(Action.type_text("Karrie"), [FIELD]) == ("type", "Karrie")
    assert action_strings(Action.simple(ActionType.PRESS_ENTER), [FIELD]) == ("press enter", "")
    assert action_strings(Action.swipe((0.2, 0.5), (0.8, 0.5)), [BUTTON]) == ("swipe", "")
    assert action_strings(str(Action.tap(0.5, 0.5)), [BUTTON]) == ("tap", "Submit")  # AutoUI strings too
    assert action_strings(None) == ("", "")  # before step 0


# ----------------------------------------------------------------------------- composition

def _marked(b=2, k=3, d_s=4, d_sa=5, d_v=3, d_e=2):
    """Arrays whose values say where they came from: f(s) 1, f(s,a) 2, image 3, goal 4, prev_action 5, action 6,
    fields 7."""
    state = {"image": np.full((b, 2 * d_v), 3.0), "goal": np.full((b, d_e), 4.0), "prev_action": np.full((b, 2 * d_e), 5.0),
             "fields": np.full((b, d_e), 7.0)}
    return dict(f_s=np.full((b, d_s), 1.0), f_sa=np.full((b, k, d_sa), 2.0), state=state, action=np.full((b, k, 2 * d_e), 6.0))


OFFICIAL = Inputs(q=["vlm", "image", "goal", "prev_action", "action"], v=["image", "goal", "prev_action"])  # VLMDoubleCritic's


def test_compose_puts_each_channel_in_its_slice_in_canonical_order():
    x_v, x_q = compose(OFFICIAL, **_marked())
    assert x_v.shape == (2, 6 + 2 + 4) and x_q.shape == (2, 3, 5 + 6 + 2 + 4 + 4)
    assert x_v.dtype == x_q.dtype == np.float32
    assert x_v[0].tolist() == [3.0] * 6 + [4.0] * 2 + [5.0] * 4  # V: image, goal, prev_action; no action, no f(s)
    assert x_q[1, 2].tolist() == [2.0] * 5 + [3.0] * 6 + [4.0] * 2 + [5.0] * 4 + [6.0] * 4
    assert input_dims(OFFICIAL, d_s=4, d_sa=5, d_v=3, d_e=2) == (12, 21)
    x_v, x_q = compose(Inputs(q=["action", "goal"], v=["vlm", "goal"]), **_marked())
    assert x_v[0].tolist() == [1.0] * 4 + [4.0] * 2 and x_q[0, 0].tolist() == [4.0] * 2 + [6.0] * 4
    assert input_dims(Inputs(q=["action", "goal"], v=["vlm", "goal"]), d_s=4, d_sa=5, d_v=3, d_e=2) == (6, 6)
    read = Inputs()  # the default: fields after prev_action, before action, in both heads
    x_v, x_q = compose(read, **_marked())
    assert x_v[0].tolist() == [3.0] * 6 + [4.0] * 2 + [5.0] * 4 + [7.0] * 2
    assert x_q[0, 1].tolist() == [2.0] * 5 + [3.0] * 6 + [4.0] * 2 + [5.0] * 4 + [7.0] * 2 + [6.0] * 4
    assert input_dims(read, d_s=4, d_sa=5, d_v=3, d_e=2) == (14, 23)


def test_compose_vlm_only_is_todays_features():
    rng = np.random.default_rng(0)
    f_s, f_sa = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 2, 5)).astype(np.float32)
    x_v, x_q = compose(Inputs(q=["vlm"], v=["vlm"]), f_s=f_s, f_sa=f_sa, state={}, action=None)
    assert np.array_equal(x_v, f_s) and np.array_equal(x_q, f_sa)
    x_v, x_q = compose({"q": ["vlm"], "v": ["vlm"]}, f_s=f_s, f_sa=f_sa, state={}, action=None)  # as config.json saves it
    assert np.array_equal(x_v, f_s) and np.array_equal(x_q, f_sa)


def test_compose_names_a_missing_channel():
    with pytest.raises(DigiqError, match="'image' selected but no state channel"):
        compose(Inputs(), f_s=None, f_sa=np.zeros((1, 2, 3)), state={}, action=np.zeros((1, 2, 4)))


# ----------------------------------------------------------------------------- the sentence encoder

def save_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT (hidden 8) with a 12-word WordPiece vocabulary: config.json, model.safetensors, tokenizer.json."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "tap", "the", "submit", "button", "type", "press", "enter"]
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32)).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_sentence_encoder_is_the_masked_mean_of_bert_normalised(tiny_bert):
    import torch
    from transformers import BertModel

    from digiq.text_encoder import SentenceEncoder

    encoder = SentenceEncoder(tiny_bert)
    texts = ["tap the submit button", "press enter", "", "tap the submit button"]
    got = encoder(texts)
    assert got.shape == (4, 8) and len(encoder.cache) == 3  # one encoding per distinct string
    model = BertModel.from_pretrained(tiny_bert).eval()
    for text, row in zip(texts, got):  # by hand, one sentence at a time (no padding): ids of [CLS] … [SEP]
        ids = [2] + [{"tap": 5, "the": 6, "submit": 7, "button": 8, "press": 10, "enter": 11}[w] for w in text.split()] + [3]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
        assert np.allclose(row, (hidden / hidden.norm()).numpy(), atol=1e-5), text
    assert np.array_equal(SentenceEncoder(tiny_bert)([""]), encoder([""]))  # the empty string: the same vector every time


def test_packaged_minilm_puts_related_sentences_closer():
    from digiq.text_encoder import SentenceEncoder

    encoder = SentenceEncoder()
    a, b, c = encoder(["click the submit button", "press the submit button", "the weather is sunny today"])
    assert encoder.dim == 384 and np.isclose(np.linalg.norm(a), 1.0, atol=1e-5)
    assert a @ b > 0.8 and a @ c < 0.2


# ----------------------------------------------------------------------------- the stage

def _tiny_dataset(root: Path) -> tuple[Path, Path]:
    """Two trajectories (3 and 1 steps) with DOM elements, distinct screenshots, and a 3-candidate table."""
    from digiq.actions import format_action
    from digiq.candidates import candidate_table, write_candidates
    from digiq.schema import Step, Trajectory
    from digiq.store import Dataset, DatasetWriter

    writer = DatasetWriter(root / "raw", gamma=0.9, source="test")
    actions = [Action.tap(0.5, 0.5), Action.type_text("Karrie"), Action.simple(ActionType.PRESS_ENTER), Action.tap(0.9, 0.9)]
    trajectories = []
    for t, (goal, steps) in enumerate((("Press submit", actions[:3]), ("Click anywhere", actions[3:]))):
        rows = []
        for s, action in enumerate(steps):
            shot, sha = writer.put_image(np.full((8, 8, 3), 40 * (t * 3 + s), dtype=np.uint8))
            rows.append(Step(traj_id=f"traj{t}", step_id=s, task="test", goal=goal, observation="o", screenshot=shot,
                             screenshot_sha256=sha, action=action, reward=0.0, done=False,
                             elements=json.dumps([FIELD | {"value": "Karrie"} if (t, s) == (0, 2) else FIELD, BUTTON])))
        trajectories.append(Trajectory(traj_id=f"traj{t}", task="test", goal=goal, steps=rows))
    writer.write_shard("s0", trajectories)
    writer.finalize()
    extra = [format_action(Action.tap(0.15, 0.5)), format_action(Action.type_text("vina"))]
    table = candidate_table((r, [r["action"], *extra]) for r in Dataset(root / "raw").table().to_pylist())
    write_candidates(table, root / "candidates.parquet")
    return root / "raw", root / "candidates.parquet"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_bert):
    return save_tiny_llava(tmp_path_factory.mktemp("llava")), tiny_bert


def _stage_params(root: Path, models: tuple[Path, Path], **channels):
    dataset, candidates = root / "raw", root / "candidates.parquet"
    return project_params(root, collect={"out": str(dataset)}, candidates={"out": str(candidates)},
                          channels={"model": str(models[0]), "encoder": str(models[1]), "out": str(root / "channels"),
                                    "metrics": str(root / "metrics" / "channels.json"), "device": "cpu", **channels})


def test_stage_writes_the_channel_tables(tmp_path, tiny_models):
    from digiq.actions import parse_action
    from digiq.channels import EpisodeChannels, VisionTower
    from digiq.pipelines import channels as stage
    from digiq.store import Dataset
    from digiq.text_encoder import SentenceEncoder

    _tiny_dataset(tmp_path)
    metrics = stage.run(_stage_params(tmp_path, tiny_models, batch_size=2))
    states, cands = (pq.read_table(tmp_path / "channels" / name) for name in (fc.STATES_FILE, fc.CANDIDATES_FILE))
    assert metrics["states"] == states.num_rows == 4 and metrics["candidates"] == cands.num_rows == 12
    assert metrics["dims"] == {"image": 64, "goal": 8, "prev_action": 16, "fields": 8, "action": 16}  # tiny CLIP tower: 32 wide
    assert json.loads((tmp_path / "metrics" / "channels.json").read_text())["states"] == 4
    rows = {r["state_key"]: r for r in states.to_pylist()}
    assert [rows[k]["prev_type"] for k in ("traj0/0", "traj0/1", "traj0/2", "traj1/0")] == ["", "tap", "type", ""]
    assert [rows[k]["prev_text"] for k in ("traj0/0", "traj0/1", "traj0/2")] == ["", "Submit", "Karrie"]
    image = {k: np.asarray(r["image"], np.float32) for k, r in rows.items()}
    assert np.array_equal(image["traj0/1"][32:], image["traj0/0"][:32])  # v(s_prev) is the previous step's v(s)
    assert not image["traj0/0"][32:].any() and not image["traj1/0"][32:].any()  # zeros at step 0
    encoder = SentenceEncoder(tiny_models[1])
    assert np.allclose(rows["traj0/1"]["prev_action"], np.concatenate(encoder(["tap", "Submit"])), atol=1e-6)
    assert np.allclose(rows["traj1/0"]["goal"], encoder(["Click anywhere"])[0], atol=1e-6)
    assert rows["traj0/1"]["fields_text"] == "Text fields: input_text#tt is empty."
    assert rows["traj0/2"]["fields_text"] == 'Text fields: input_text#tt holds "Karrie".'  # what was typed at step 1
    assert np.allclose(rows["traj0/2"]["fields"], encoder(['Text fields: input_text#tt holds "Karrie".'])[0], atol=1e-6)
    dataset = Dataset(tmp_path / "raw")
    shot = next(r["screenshot"] for r in dataset.table().to_pylist() if (r["traj_id"], r["step_id"]) == ("traj0", 2))
    assert np.allclose(image["traj0/2"][:32], VisionTower(tiny_models[0], device="cpu")([dataset.load_image(shot)])[0], atol=1e-5)
    c = {r["cand_key"]: r for r in cands.to_pylist()}
    assert (c["traj0/0/0"]["action_type"], c["traj0/0/0"]["action_text"]) == ("tap", "Submit")
    assert (c["traj0/0/1"]["action_type"], c["traj0/0/1"]["action_text"]) == ("tap", "input_text#tt")
    assert (c["traj0/2/0"]["action_type"], c["traj0/2/2"]["action_text"]) == ("press enter", "vina")
    assert c["traj1/0/0"]["event_timestamp"] == fc.event_timestamp(0)

    live = EpisodeChannels.load(_stage_params(tmp_path, tiny_models).channels)  # live evaluation: step by step
    steps = sorted(dataset.table().to_pylist(), key=lambda r: (r["traj_id"], r["step_id"]))
    previous = None
    for row in steps:
        if row["step_id"] == 0:
            live.reset()
            previous = None
        page = json.loads(row["elements"])
        state = live.step(dataset.load_image(row["screenshot"]), row["goal"], page, previous)
        key = fc.state_key(row["traj_id"], row["step_id"])
        assert set(state) == set(STATE_CHANNELS)
        for name in STATE_CHANNELS:
            assert np.allclose(state[name][0], rows[key][name], atol=1e-5), (key, name)
        offline = [c[fc.cand_key(key, k)]["action"] for k in range(3)]
        candidates = [parse_action(a) for a in pq.read_table(tmp_path / "candidates.parquet").to_pandas().query(
            f"traj_id == '{row['traj_id']}' and step_id == {row['step_id']}").sort_values("cand_idx")["action"]]
        assert np.allclose(live.actions(candidates, page), offline, atol=1e-6)
        previous = parse_action(row["action"])


def test_stage_refuses_a_candidate_of_an_unknown_state_and_keeps_the_old_tables(tmp_path, tiny_models):
    import pyarrow as pa

    from digiq.pipelines import channels as stage

    _, candidates = _tiny_dataset(tmp_path)
    params = _stage_params(tmp_path, tiny_models)
    stage.run(params)
    before = (tmp_path / "channels" / fc.STATES_FILE).read_bytes()
    table = pq.read_table(candidates)
    pq.write_table(table.set_column(0, "traj_id", pa.array(["ghost"] * table.num_rows)), candidates)
    with pytest.raises(DigiqError, match=r"candidates\.parquet: step_id: candidate of state 'ghost/0', which is not in the dataset"):
        stage.run(params)
    pq.write_table(table.drop_columns(["action"]), candidates)
    with pytest.raises(DigiqError, match=r"candidates\.parquet: action: missing column"):
        stage.run(params)
    settings = write_params(tmp_path, **{name: dict(getattr(params, name)) for name in ("collect", "candidates", "channels")})
    result = CliRunner().invoke(command_app(channels_cli), ["channels", "--params", str(settings)])
    assert result.exit_code == 2 and result.output.count("\n") == 1  # one line, no traceback
    assert "candidates.parquet: action: missing column" in result.output
    assert (tmp_path / "channels" / fc.STATES_FILE).read_bytes() == before  # nothing half-written
    assert not list((tmp_path).glob(".channels.*"))


# ----------------------------------------------------------------------------- the feature views

def test_channel_views_serve_training_sets_and_compose(tmp_path, tiny_models):
    from digiq.channel_tables import build_tables, write_tables
    from digiq.channels import VisionTower
    from digiq.feature_sources import FeatureInputs
    from digiq.feature_write import materialize
    from digiq.store import Dataset
    from digiq.store_client import online_channels, open_store
    from digiq.text_encoder import SentenceEncoder
    from digiq.training_data import read_training_data


    copy_feature_repo(tmp_path)
    paths = write_synthetic_sources(tmp_path / "data", n_states=10, k=3, dim=4)
    states, cands, _ = build_tables(Dataset(paths["dataset"]), paths["candidate_table"],
                                    VisionTower(tiny_models[0], device="cpu"), SentenceEncoder(tiny_models[1]))
    write_tables(tmp_path / "data" / "channels", states, cands)
    params = project_params(tmp_path, channels={"out": str(tmp_path / "data" / "channels")})
    result = materialize(FeatureInputs.from_params(params))
    assert result["rows"]["image_channel"] == 10 and result["rows"]["action_channel"] == 30
    assert result["dim_image"] == 64 and result["dim_action"] == 16

    data = read_training_data(params.features, channels=params.channels.out)
    f = data.frame
    by_key = {r["state_key"]: r for r in states.to_pylist()}
    for name in STATE_CHANNELS:
        assert np.array_equal(f.channels[name], np.array([by_key[k][name] for k in f.state_key], np.float32))
    action = {r["cand_key"]: r["action"] for r in cands.to_pylist()}
    assert np.array_equal(f.channels["action"][3, 1], np.asarray(action[fc.cand_key(f.state_key[3], 1)], np.float32))
    row = {k: i for i, k in enumerate(f.state_key)}
    with_next = np.flatnonzero(f.has_next)
    assert len(with_next) and not f.next_channels["image"][~f.has_next].any()

    t = data.transitions(inputs=Inputs())
    assert t.s.shape == (10, 64 + 8 + 16 + 8) and t.cand_sa.shape == (10, 3, 4 + 64 + 8 + 16 + 8 + 16)
    assert np.array_equal(t.sa.numpy(), t.cand_sa[:, 0].numpy())
    for i in with_next:  # x_V(s') is the next state's own x_V
        nxt = fc.state_key(data.traj_id[i], data.step_id[i] + 1)
        assert np.array_equal(t.s_next[i].numpy(), t.s[row[nxt]].numpy())
    assert not t.s_next[~f.has_next].any()
    today = data.transitions()
    assert np.array_equal(data.transitions(inputs=Inputs(q=["vlm"], v=["vlm"])).cand_sa.numpy(), today.cand_sa.numpy())
    assert np.array_equal(today.s.numpy(), f.state)  # inputs=None: f(s) as before
    picked = data.transitions(np.array([4, 1]), inputs=Inputs())
    assert np.array_equal(picked.s.numpy(), t.s[[4, 1]].numpy())

    store = open_store(params.features.repo, params.features.variant)
    traj, step = fc.split_state_keys([f.state_key[2]])
    online = online_channels(store, traj[0], int(step[0]))
    assert np.array_equal(online["goal"], f.channels["goal"][2])


def test_training_without_channel_sources_names_the_stage(tmp_path):
    from digiq.training_data import read_training_data


    project = feature_project(tmp_path, n_states=6, k=2, dim=4)
    params = project_params(project)
    with pytest.raises(DigiqError, match=r"channels.out: missing channel source 'channel_states' \(run `digiq channels` first\)"):
        read_training_data(params.features, channels=project / "data" / "channels")
    with pytest.raises(DigiqError, match="channel 'image' selected but no state channel"):
        read_training_data(params.features).transitions(inputs=Inputs())


def test_live_featurizer_composes_the_channels_as_training_sets_do(tmp_path, tiny_models):
    """LiveFeaturizer (live evaluation) gives, step by step, x_V / x_Q = compose(f(s), f(s, a), this step's channels):
    v(s_prev) is the step before's v, the previous action is named on the previous page; a second featurizer reads
    the same values back from the shared cache; VLM-only inputs give f(s), f(s, a) alone."""
    import torch

    from digiq.actions import parse_action
    from digiq.channels import EpisodeChannels
    from digiq.envs.view import StepView
    from digiq.extractor import build_extractor, featurize
    from digiq.live_features import LiveFeaturizer
    from digiq.store import Dataset

    _tiny_dataset(tmp_path)
    dataset = Dataset(tmp_path / "raw")
    steps = sorted((r for r in dataset.table().to_pylist() if r["traj_id"] == "traj0"), key=lambda r: r["step_id"])
    images = [dataset.load_image(r["screenshot"]) for r in steps]
    pages = [json.loads(r["elements"]) for r in steps]
    actions = [parse_action(r["action"]) for r in steps]
    candidates = [actions[0], Action.tap(0.15, 0.5), Action.type_text("vina")]
    views = [StepView("test", r["goal"], r["observation"], page, actions[:i][-1:], np.asarray(image))
             for i, (r, page, image) in enumerate(zip(steps, pages, images))]
    recipe = {"variant": "finetuned", "model": str(tiny_models[0]), "layer": 1, "pooling": "last", "dtype": "float32",
              "device": "cpu", "channels": {"model": str(tiny_models[0]), "encoder": str(tiny_models[1]),
                                            "dtype": "float32", "batch_size": 4}}
    inputs = Inputs(q=list(ORDER), v=list(STATE_CHANNELS))  # every channel, the text fields' contents included
    live = LiveFeaturizer(**recipe, cache=str(tmp_path / "cache"))
    live.reset()
    got = [live(view, candidates, inputs) for view in views]

    extractor, _, _ = build_extractor("finetuned", str(tiny_models[0]), layer=1, pooling="last", dtype="float32", device="cpu")
    channels = EpisodeChannels.load(_stage_params(tmp_path, tiny_models).channels)
    channels.reset()
    for i, (view, image, page) in enumerate(zip(views, images, pages)):
        f_s, f_sa = featurize(extractor, image, view.goal, view.observation, candidates, page)
        state = channels.step(image, view.goal, page, actions[i - 1] if i else None)
        x_v, x_q = compose(inputs, f_s=f_s[None], f_sa=f_sa[None], state=state, action=channels.actions(candidates, page)[None])
        assert np.allclose(got[i][0].numpy(), x_v, atol=1e-5) and np.allclose(got[i][1].numpy(), x_q, atol=1e-5), i
    d_v, d_e = channels.vision.dim, channels.encoder.dim
    assert tuple(got[0][0].shape) == (1, live.dims(inputs)[0]) and tuple(got[0][1].shape) == (1, 3, live.dims(inputs)[1])
    assert live.dims(inputs) == input_dims(inputs, extractor.dim_state, extractor.dim_candidate, d_v, d_e)
    assert not got[0][0][0, d_v:2 * d_v].any() and np.allclose(got[1][0][0, d_v:2 * d_v], got[0][0][0, :d_v])  # v(s_prev)

    cached = sorted((tmp_path / "cache").iterdir())
    again = LiveFeaturizer(**recipe, cache=str(tmp_path / "cache"))
    again.reset()
    for view, (x_v, x_q) in zip(views, got):
        y_v, y_q = again(view, candidates, inputs)
        assert torch.equal(y_v, x_v) and torch.equal(y_q, x_q)
    assert sorted((tmp_path / "cache").iterdir()) == cached  # every step read back, nothing recomputed

    s, cand = LiveFeaturizer(**recipe)(views[0], candidates, Inputs(q=["vlm"], v=["vlm"]))
    f_s, f_sa = featurize(extractor, images[0], views[0].goal, views[0].observation, candidates, pages[0])
    assert np.allclose(s[0].numpy(), f_s) and np.allclose(cand[0].numpy(), f_sa)
