"""Batched live featurization (:meth:`digiq.live_features.LiveFeaturizer.batch`): the features of many browsers'
steps computed in one call, each episode's previous step kept by the caller, equal exactly (same dtype, same bits)
what one featurizer computes one step at a time; real tiny models (a LLaVA-shaped checkpoint and a BERT encoder)."""

from __future__ import annotations

import numpy as np
import pytest
from test_channels import BUTTON, FIELD, save_tiny_bert
from tiny_llava import save_tiny_llava

from digiq.channels import ORDER, STATE_CHANNELS, Inputs
from digiq.envs.view import StepView
from digiq.errors import DigiqError
from digiq.schema import Action

ALL = Inputs(q=list(ORDER), v=list(STATE_CHANNELS))  # every channel: v(s_prev) and the previous page are read
VLM = Inputs(q=["vlm"], v=["vlm"])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    llava, bert = save_tiny_llava(tmp_path_factory.mktemp("llava")), save_tiny_bert(tmp_path_factory.mktemp("bert"))
    return {"variant": "finetuned", "model": str(llava), "layer": 1, "pooling": "last", "dtype": "float32", "device": "cpu",
            "channels": {"model": str(llava), "encoder": str(bert), "dtype": "float32", "batch_size": 4}}


def episode(e: int, steps: int = 3) -> list[tuple[StepView, list[Action]]]:
    """``steps`` live steps of episode ``e``: distinct screenshots, a page whose text field fills up, the action
    taken before each step, and three candidates (a tap on the button, a tap elsewhere, a typed text)."""
    rng = np.random.default_rng(e)
    taken = [Action.tap(0.5, 0.5), Action.type_text(f"name{e}"), Action.tap(0.9, 0.1)]
    out = []
    for t in range(steps):
        page = [FIELD | {"value": f"name{e}"} if t == 2 else FIELD, BUTTON]
        shot = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
        view = StepView("test", f"Goal of episode {e}", f"Previous actions: {t}", page, taken[:t][-1:], shot)
        out.append((view, [Action.tap(0.5, 0.5), Action.tap(0.15, 0.5 + 0.1 * e), Action.type_text(f"text {e} {t}")]))
    return out


def test_batched_features_of_interleaved_episodes_equal_one_at_a_time(recipe):
    import torch

    from digiq.live_features import EpisodeState, LiveFeaturizer, Request

    episodes = [episode(e) for e in range(3)]
    alone = LiveFeaturizer(**recipe)
    expected = {}
    for e, steps in enumerate(episodes):  # one browser after another, one step at a time (today's per-worker model)
        alone.reset()
        for t, (view, cands) in enumerate(steps):
            expected[e, t] = alone(view, cands, ALL)
            expected[e, t, "vlm"] = alone(view, cands, VLM)

    shared = LiveFeaturizer(**recipe)  # another model: its sentence encoder has seen no string yet
    states = [EpisodeState() for _ in episodes]
    for t in range(3):
        order = [2, 0, 1] if t % 2 else [1, 2, 0]  # the browsers' requests arrive in another order each step
        requests = [Request(*episodes[e][t], ALL, states[e]) for e in order]
        requests += [Request(*episodes[e][t], VLM) for e in order]  # a VLM-only chooser's requests in the same batch
        got = shared.batch(requests)
        for i, e in enumerate(order):
            for (x_v, x_q), (y_v, y_q) in ((got[i], expected[e, t]), (got[len(order) + i], expected[e, t, "vlm"])):
                assert x_v.dtype == y_v.dtype == torch.float32 and x_q.dtype == y_q.dtype
                assert torch.equal(x_v, y_v) and torch.equal(x_q, y_q), (e, t)
    d_v = shared.channels.vision.dim
    assert all(np.array_equal(s.image, expected[e, 2][0][0, :d_v].numpy()) for e, s in enumerate(states))
    assert not expected[0, 0][0][0, d_v:2 * d_v].any() and expected[0, 1][0][0, d_v:2 * d_v].equal(expected[0, 0][0][0, :d_v])


def test_batched_features_are_read_back_from_the_shared_cache(recipe, tmp_path):
    import torch

    from digiq.live_features import EpisodeState, LiveFeaturizer, Request

    steps = [episode(e, steps=2) for e in range(2)]
    writer = LiveFeaturizer(**recipe, cache=str(tmp_path))
    states = [EpisodeState(), EpisodeState()]
    first = [writer.batch([Request(*steps[e][t], ALL, states[e]) for e in range(2)]) for t in range(2)]
    stored = sorted(tmp_path.iterdir())
    assert len(stored) == 4 and not list(tmp_path.glob("*.part.npz"))
    reader = LiveFeaturizer(**recipe, cache=str(tmp_path))
    for e in range(2):
        reader.reset()
        for t in range(2):
            x_v, x_q = reader(*steps[e][t], ALL)
            assert torch.equal(x_v, first[t][e][0]) and torch.equal(x_q, first[t][e][1])
    assert sorted(tmp_path.iterdir()) == stored  # every step read back, nothing recomputed


def test_one_step_per_episode_and_batch(recipe):
    from digiq.live_features import EpisodeState, LiveFeaturizer, Request

    featurizer, state = LiveFeaturizer(**recipe), EpisodeState()
    (view, cands), (after, more) = episode(0, steps=2)
    with pytest.raises(DigiqError, match="episode: each request that reads channels needs its own episode state"):
        featurizer.batch([Request(view, cands, ALL, state), Request(after, more, ALL, state)])
    with pytest.raises(DigiqError, match="its own episode state"):
        featurizer.batch([Request(view, cands, ALL)])


def test_the_image_channel_reads_the_tower_pass_of_f_s_and_gets_the_same_bits(recipe):
    """Where the channel model's vision tower is the extractor's (frozen weights, same dtype), one tower pass per
    screenshot serves f(s) and v(s); the features equal those of a separately loaded channel tower exactly."""
    import torch

    from digiq.channels import ChannelsParams, EpisodeChannels
    from digiq.live_features import LiveFeaturizer
    from digiq.vlm import load_vlm
    from digiq.vlm.vision import same_vision

    shared, apart = LiveFeaturizer(**recipe), LiveFeaturizer(**recipe)
    apart._channels = EpisodeChannels.load(ChannelsParams(**recipe["channels"]), device="cpu")
    assert shared.channels.vision.shared and not apart.channels.vision.shared
    calls = []
    tower = shared.extractor.vlm.vision_tower
    tower.register_forward_hook(lambda *args: calls.append(1))
    for featurizer in (shared, apart):
        featurizer.reset()
    for view, cands in episode(0):
        before = len(calls)
        for (x_v, x_q), (y_v, y_q) in [(shared(view, cands, ALL), apart(view, cands, ALL))]:
            assert torch.equal(x_v, y_v) and torch.equal(x_q, y_q)
        assert len(calls) - before == 1  # f(s)'s pass, then v(s) from it
    bf16 = load_vlm(recipe["model"], dtype="bfloat16", device="cpu")
    assert not same_vision(bf16, shared.extractor.vlm)  # another dtype: the channel keeps its own tower
