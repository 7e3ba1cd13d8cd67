"""Live features: what a trained chooser reads at live steps, computed as the offline stages compute it.

    featurizer = LiveFeaturizer(variant, model, layer, pooling, dtype, device)
    featurizer.reset()                                   # at each episode start
    s, cand_sa = featurizer(view, candidates, inputs)    # x_V(s) [1, d_s], x_Q(s, a_k) [1, K, d_sa]

    episodes = [EpisodeState() for _ in browsers]        # the batched, stateless form (one model, many browsers)
    out = featurizer.batch([Request(view_b, candidates_b, inputs_b, episodes[b]) for b in ...])  # [(x_V, x_Q), ...]

With ``inputs`` None (or an :class:`~digiq.channels.Inputs` that is VLM-only) these are today's features,
f(s) and f(s, a_k) of the embed stage's extractor and recipe (``variant``, ``model``: its checkpoint folder, and
embed's ``layer``, ``pooling``, ``dtype``, ``device``); the screenshot is encoded once per step and every candidate
reuses the encoding. Other inputs add the channels of :mod:`digiq.channels` (``channels``: the channels stage's
model, encoder and dtype), composed by :func:`digiq.channels.compose` as training sets are: v(s) and v(s_prev), the
goal, the previous action (``view.previous_actions[-1]``, named on the previous page) and each candidate's type and
text.

Batching (:meth:`LiveFeaturizer.batch`): the models hold no episode. What a step reads of the step before (v(s_prev)
and the previous page) is an :class:`EpisodeState` that the caller keeps, one per episode, and passes with each
:class:`Request`; a request's features are a function of (view, candidates, inputs, episode state) alone, whatever
else is in its batch. Across the requests of a batch the screenshots go through the VLM's vision tower and the
channels' vision tower in one call each (image encodings are row-independent); the language model then runs state
by state, as one step alone runs it (its shared-prefix cache is per state, and int8 dynamic quantization scales
activations per call, so mixing states in one call would change their features). The sentence encoder encodes each
new string alone (no padding: a string's vector does not depend on the strings beside it) and caches it. The
single-view call is ``batch`` of one request with the featurizer's own episode state.

Every method of an evaluation plays the same seeds and sees the same candidates in the same state (its first step
always), so a state's features are computed once per run: with a ``cache`` folder, the features of a call are
stored under the sha256 of everything they depend on (the recipe; whether channels are read and, if so, the channel
models and the previous step's v and page; the screenshot's bytes, goal, observation, DOM elements and candidate
strings) and read back by any later call, in any worker, with the same key: choosers reading different channel
selections share an entry, as every channel is stored and the selection composed after. The cache is scratch space
of one run (the evaluate stage removes it); part files carry the writer's host and pid (several hosts may share it).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq.errors import DigiqError

import numpy as np

if TYPE_CHECKING:
    import torch

    from digiq.envs.view import StepView
    from digiq.schema import Action


def vlm_only(inputs: Any) -> bool:
    """True for ``inputs`` None (a model saved before channels existed) or an Inputs reading the VLM feature alone."""
    from digiq.channels import as_inputs

    return inputs is None or as_inputs(inputs).vlm_only


@dataclass
class EpisodeState:
    """What the next step of one live episode reads of the step before: v(s_prev) [d_v] and the previous page
    (None before the first step). Kept by the caller, one per episode; :meth:`LiveFeaturizer.batch` updates it."""

    image: np.ndarray | None = None
    elements: Any = None

    def remember(self, v: np.ndarray, elements: Any, width: int) -> None:
        """Make (v, page) the previous step's (v: the first ``width`` values of this step's image channel)."""
        self.image, self.elements = np.asarray(v, np.float32)[:width], elements

    def previous_key(self) -> bytes:
        """Bytes that identify what this episode's next step reads of the previous one (its v and page)."""
        if self.image is None:
            return b"first step"
        return self.image.tobytes() + json.dumps(self.elements, sort_keys=True, default=str).encode()


@dataclass
class Request:
    """One live step to featurize: its view, candidates, the chooser's inputs and (when they read channels) its
    episode's state."""

    view: StepView
    actions: list[Action]
    inputs: Any = None
    episode: EpisodeState | None = None

    @property
    def channels(self) -> bool:
        return not vlm_only(self.inputs)


Features = tuple["torch.Tensor", "torch.Tensor"]  # x_V [1, d_v_in], x_Q [1, K, d_q_in]


class LiveFeaturizer:
    """x_V(s) [1, d_s] and x_Q(s, a_k) [1, K, d_sa] of live states, one or a batch at a time (module docstring)."""

    episode: EpisodeState | None = None  # the single-view call's episode (:meth:`reset`)

    def __init__(self, variant: str, model: str, layer: int, pooling: str, dtype: str, device: str,
                 channels: dict[str, Any] | None = None, cache: str | None = None, quantize: str = "auto"):
        from digiq.extractor import build_extractor

        self.variant, self.model, self.device, self.channel_recipe = variant, model, device, dict(channels or {})
        self.extractor, self.model_hash, dtype_name = build_extractor(variant, model, layer=layer, pooling=pooling,
                                                                      dtype=dtype, device=device, quantize=quantize)
        self.recipe = json.dumps([variant, self.model_hash, layer, pooling, dtype_name])
        self.cache = Path(cache) if cache else None
        self._channels: Any = None  # EpisodeChannels (its encoder and vision tower), loaded on first use
        self._channel_hash: str | None = None

    @property
    def channels(self) -> Any:
        """The channel models, an :class:`~digiq.channels.EpisodeChannels` (loaded once, on first use)."""
        if self._channels is None:
            from digiq.channels import ChannelsParams, EpisodeChannels

            if not self.channel_recipe:
                raise DigiqError("this chooser reads channels beyond the VLM feature, but the live recipe names no "
                                 "channel models (channels.model, channels.encoder)", field="channels")
            self._channels = EpisodeChannels.load(ChannelsParams(**self.channel_recipe), device=self.device,
                                                  share=getattr(self.extractor, "vlm", None))
        return self._channels

    def reset(self) -> None:
        """Forget the episode so far (the previous step's v and page): call at each episode start."""
        self.episode = EpisodeState()

    def dims(self, inputs: Any = None) -> tuple[int, int]:
        """(d_s, d_sa): the widths of x_V and x_Q under ``inputs``."""
        d_s, d_sa = self.extractor.dim_state, self.extractor.dim_candidate
        if vlm_only(inputs):
            return d_s, d_sa
        from digiq.channels import input_dims

        return input_dims(inputs, d_s, d_sa, self.channels.vision.dim, self.channels.encoder.dim)

    def __call__(self, view: StepView, actions: list[Action], inputs: Any = None) -> Features:
        if self.episode is None:
            self.reset()
        return self.batch([Request(view, actions, inputs, self.episode)])[0]

    def batch(self, requests: list[Request]) -> list[Features]:
        """(x_V, x_Q) of each request, each as if it were computed alone; the episode states of requests that read
        channels advance by one step. Steps of one episode go in separate, successive calls."""
        episodes = [id(r.episode) for r in requests if r.channels]
        if len(set(episodes)) != len(episodes) or any(r.channels and r.episode is None for r in requests):
            raise DigiqError("each request that reads channels needs its own episode state (one step per episode "
                             "and batch)", field="episode")
        if any(r.view.screenshot is None for r in requests):
            raise DigiqError("a live step has no screenshot", field="screenshot")
        paths = [self.cache / f"{self.key(r.view, r.actions, r.inputs, r.episode)}.npz" if self.cache else None
                 for r in requests]
        arrays = [_load(path) if path is not None else None for path in paths]
        todo = [i for i, a in enumerate(arrays) if a is None]
        for i, computed in zip(todo, self.compute_many([requests[i] for i in todo]), strict=True):
            arrays[i] = computed
            if paths[i] is not None:
                _store(paths[i], computed)
        return [self._compose(r, a) for r, a in zip(requests, arrays, strict=True)]

    def _compose(self, request: Request, arrays: dict[str, np.ndarray]) -> Features:
        import torch

        if not request.channels:
            return (torch.from_numpy(arrays["f_s"]).unsqueeze(0).float(),
                    torch.from_numpy(arrays["f_sa"]).unsqueeze(0).float())
        from digiq.channels import STATE_CHANNELS, compose

        assert request.episode is not None
        request.episode.remember(arrays["image"][0], request.view.elements, self.channels.vision.dim)
        state = {name: arrays[name] for name in STATE_CHANNELS}
        x_v, x_q = compose(request.inputs, f_s=arrays["f_s"][None], f_sa=arrays["f_sa"][None], state=state,
                           action=arrays["action"][None])
        return torch.from_numpy(x_v).float(), torch.from_numpy(np.ascontiguousarray(x_q)).float()

    def compute_many(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        """f(s) [d_s], f(s, a_k) [K, d_sa] of each request and, where it reads channels, this step's channels: the
        state channels (image, goal, prev_action, fields) [1, d] each and the candidates' action channel [K, 2·d_e]
        (nothing read from or written to the cache; episode states unchanged)."""
        from PIL import Image

        if not requests:
            return []
        images = [Image.fromarray(r.view.screenshot) for r in requests]
        arrays = [{"f_s": f_s, "f_sa": f_sa} for f_s, f_sa in self._vlm_features(requests, images)]
        with_channels = [i for i, r in enumerate(requests) if r.channels]
        if with_channels:
            v = self.channels.vision([images[i] for i in with_channels])
            for row, i in enumerate(with_channels):
                arrays[i].update(self._channel_arrays(requests[i], v[row]))
        return arrays

    def _vlm_features(self, requests: list[Request], images: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        """f(s), f(s, a_k) per request: :func:`~digiq.extractor.featurize` for one; for several, the screenshots
        encoded in one call and each state's language-model passes run as featurize runs them."""
        from digiq.extractor import featurize

        if len(requests) == 1:
            v = requests[0].view
            return [featurize(self.extractor, images[0], v.goal, v.observation, requests[0].actions, v.elements)]
        tokens = self.extractor.encode(images)
        out = []
        for i, (r, image) in enumerate(zip(requests, images, strict=True)):
            v, own = r.view, tokens[i:i + 1]
            f_s = self.extractor.states(own, [v.goal], [v.observation], [v.elements])[0]
            out.append((f_s, self.extractor.candidates(own, image.size, v.goal, v.observation, r.actions, v.elements)))
        return out

    def _channel_arrays(self, request: Request, v: np.ndarray) -> dict[str, np.ndarray]:
        """This step's state channels (:func:`~digiq.channels.state_channels`, the previous step read from the
        request's episode state) and its candidates' action channel, every new string encoded alone."""
        from digiq.channels import action_strings, action_vectors, state_channels

        view, episode = request.view, request.episode or EpisodeState()
        encoder: Any = _EachAlone(self.channels.encoder)  # a SentenceEncoder to the channel functions
        previous = view.previous_actions[-1] if view.previous_actions else None
        arrays = state_channels(encoder, v, view.goal, view.elements, previous, episode.image, episode.elements)
        arrays["action"] = action_vectors(encoder, [action_strings(a, view.elements) for a in request.actions])
        return arrays

    def key(self, view: StepView, actions: list[Action], inputs: Any = None,
            episode: EpisodeState | None = None) -> str:
        """sha256 of everything the features of (view, actions) depend on (module docstring)."""
        from digiq.actions import format_action

        h = hashlib.sha256(self.recipe.encode())
        channels = not vlm_only(inputs)  # what is stored: f(s), f(s, a) and, when read, every channel (composed after)
        h.update(json.dumps([channels, view.goal, view.observation, [format_action(a) for a in actions]]).encode())
        h.update(json.dumps(view.elements, sort_keys=True, default=str).encode())
        if channels:  # the channels' models, and the previous step (f(s), f(s, a) read this screen alone)
            if self._channel_hash is None:
                self.channels  # noqa: B018 - a clear error when no channel models are named
                self._channel_hash = channel_hash(self.channel_recipe)
            h.update(self._channel_hash.encode() + (episode or self.episode or EpisodeState()).previous_key())
        h.update(f"{view.screenshot.shape}{view.screenshot.dtype}".encode() + view.screenshot.tobytes())
        return h.hexdigest()


class _EachAlone:
    """A sentence encoder that encodes each string it has not seen alone before reading its cache: padded beside
    other strings, a string's vector changes in the last bits, so a step's channels would depend on its batch."""

    def __init__(self, encoder: Any):
        self.encoder, self.dim = encoder, encoder.dim

    def __call__(self, texts: list[str]) -> np.ndarray:
        for text in dict.fromkeys(texts):
            if text not in self.encoder.cache:
                self.encoder.warm([text])
        return self.encoder(texts)


def channel_hash(recipe: dict[str, Any]) -> str | None:
    """What the channel models are: the vision tower's checkpoint hash, the encoder folder's and the dtype."""
    if not recipe:
        return None
    from digiq.extractor import model_hash
    from digiq.vlm.build import minilm_dir

    encoder = recipe.get("encoder") or minilm_dir()
    return json.dumps([model_hash(recipe["model"]), model_hash(encoder), recipe.get("dtype")])


def _load(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    except (OSError, KeyError, ValueError):  # absent, or not (yet) a whole file: compute instead
        return None


def _store(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write-then-rename, so that a reader in another worker never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.stem}.{os.getpid()}@{socket.gethostname()}.part.npz")
    np.savez(part, **arrays)
    os.replace(part, path)
