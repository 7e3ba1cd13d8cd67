"""Live features: what a trained chooser reads at one live step, computed as the offline stages compute it.

    featurizer = LiveFeaturizer(variant, model, layer, pooling, dtype, device)
    featurizer.reset()                                   # at each episode start
    s, cand_sa = featurizer(view, candidates, inputs)    # x_V(s) [1, d_s], x_Q(s, a_k) [1, K, d_sa]

With ``inputs`` None (or an :class:`~digiq.channels.Inputs` that is VLM-only) these are today's features,
f(s) and f(s, a_k) of the embed stage's extractor and recipe (``variant``, ``model``: its checkpoint folder, and
embed's ``layer``, ``pooling``, ``dtype``, ``device``); the screenshot is encoded once per step and every candidate
reuses the encoding. Other inputs add the channels of :mod:`digiq.channels` (``channels``: the channels stage's
model, encoder and dtype), composed by :func:`digiq.channels.compose` as training sets are: v(s) and v(s_prev), the
goal, the previous action (``view.previous_actions[-1]``, named on the previous page) and each candidate's type and
text. The featurizer keeps the previous step's v and page between calls of one episode (:meth:`reset` forgets them),
so it must see every step of an episode in order.

Every method of an evaluation plays the same seeds and sees the same candidates in the same state (its first step
always), so a state's features are computed once per run: with a ``cache`` folder, the features of a call are
stored under the sha256 of everything they depend on (the recipe; whether channels are read and, if so, the channel
models and the previous step's v and page; the screenshot's bytes, goal, observation, DOM elements and candidate
strings) and read back by any later call, in any worker, with the same key: choosers reading different channel
selections share an entry, as every channel is stored and the selection composed after. The cache is scratch space of one run (the evaluate stage removes it).
"""

from __future__ import annotations

import hashlib
import json
import os
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


class LiveFeaturizer:
    """x_V(s) [1, d_s] and x_Q(s, a_k) [1, K, d_sa] of a live state (module docstring)."""

    def __init__(self, variant: str, model: str, layer: int, pooling: str, dtype: str, device: str,
                 channels: dict[str, Any] | None = None, cache: str | None = None):
        from digiq.extractor import build_extractor

        self.variant, self.model, self.device, self.channel_recipe = variant, model, device, dict(channels or {})
        self.extractor, self.model_hash, dtype_name = build_extractor(variant, model, layer=layer, pooling=pooling,
                                                                      dtype=dtype, device=device)
        self.recipe = json.dumps([variant, self.model_hash, layer, pooling, dtype_name])
        self.cache = Path(cache) if cache else None
        self._channels: Any = None  # EpisodeChannels, loaded on the first call that reads a channel
        self._channel_hash: str | None = None

    @property
    def channels(self) -> Any:
        """The episode's :class:`~digiq.channels.EpisodeChannels` (loaded once, on first use)."""
        if self._channels is None:
            from digiq.channels import ChannelsParams, EpisodeChannels

            if not self.channel_recipe:
                raise DigiqError("this chooser reads channels beyond the VLM feature, but the live recipe names no "
                                 "channel models (channels.model, channels.encoder)", field="channels")
            self._channels = EpisodeChannels.load(ChannelsParams(**self.channel_recipe), device=self.device)
        return self._channels

    def reset(self) -> None:
        """Forget the episode so far (the previous step's v and page): call at each episode start."""
        if self._channels is not None:
            self._channels.reset()

    def dims(self, inputs: Any = None) -> tuple[int, int]:
        """(d_s, d_sa): the widths of x_V and x_Q under ``inputs``."""
        d_s, d_sa = self.extractor.dim_state, self.extractor.dim_candidate
        if vlm_only(inputs):
            return d_s, d_sa
        from digiq.channels import input_dims

        return input_dims(inputs, d_s, d_sa, self.channels.vision.dim, self.channels.encoder.dim)

    def __call__(self, view: StepView, actions: list[Action], inputs: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if view.screenshot is None:
            raise DigiqError("a live step has no screenshot", field="screenshot")
        path = self.cache / f"{self.key(view, actions, inputs)}.npz" if self.cache else None
        arrays = _load(path) if path is not None else None
        if arrays is None:
            arrays = self.compute(view, actions, with_channels=not vlm_only(inputs))
            if path is not None:
                _store(path, arrays)
        if not vlm_only(inputs):
            from digiq.channels import STATE_CHANNELS, compose

            self.channels.remember(arrays["image"][0], view.elements)
            state = {name: arrays[name] for name in STATE_CHANNELS}
            x_v, x_q = compose(inputs, f_s=arrays["f_s"][None], f_sa=arrays["f_sa"][None], state=state,
                               action=arrays["action"][None])
            return torch.from_numpy(x_v).float(), torch.from_numpy(np.ascontiguousarray(x_q)).float()
        return torch.from_numpy(arrays["f_s"]).unsqueeze(0).float(), torch.from_numpy(arrays["f_sa"]).unsqueeze(0).float()

    def compute(self, view: StepView, actions: list[Action], *, with_channels: bool) -> dict[str, np.ndarray]:
        """f(s) [d_s], f(s, a_k) [K, d_sa] and, ``with_channels``, this step's channels: the state channels
        (image, goal, prev_action, fields) [1, d] each and the candidates' action channel [K, 2·d_e]."""
        from PIL import Image

        from digiq.extractor import featurize

        image = Image.fromarray(view.screenshot)
        f_s, f_sa = featurize(self.extractor, image, view.goal, view.observation, actions, view.elements)
        arrays = {"f_s": f_s, "f_sa": f_sa}
        if with_channels:
            previous = view.previous_actions[-1] if view.previous_actions else None
            arrays.update(self.channels.step(image, view.goal, view.elements, previous))
            arrays["action"] = self.channels.actions(actions, view.elements)
        return arrays

    def key(self, view: StepView, actions: list[Action], inputs: Any = None) -> str:
        """sha256 of everything the features of (view, actions) depend on (module docstring)."""
        from digiq.actions import format_action

        h = hashlib.sha256(self.recipe.encode())
        channels = not vlm_only(inputs)  # what is stored: f(s), f(s, a) and, when read, every channel (composed after)
        h.update(json.dumps([channels, view.goal, view.observation, [format_action(a) for a in actions]]).encode())
        h.update(json.dumps(view.elements, sort_keys=True, default=str).encode())
        if channels:  # the channels' models, and the previous step (f(s), f(s, a) read this screen alone)
            previous = self.channels.previous_key()  # loads the channels (a clear error when none are named)
            if self._channel_hash is None:
                self._channel_hash = channel_hash(self.channel_recipe)
            h.update(self._channel_hash.encode() + previous)
        h.update(f"{view.screenshot.shape}{view.screenshot.dtype}".encode() + view.screenshot.tobytes())
        return h.hexdigest()


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
    part = path.with_name(f"{path.stem}.{os.getpid()}.part.npz")
    np.savez(part, **arrays)
    os.replace(part, path)
