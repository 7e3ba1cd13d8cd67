"""Live features: what a trained chooser reads at one live step, computed as the offline stages compute it.

    featurizer = LiveFeaturizer(variant, model, layer, pooling, dtype, device)
    featurizer.reset()                                   # at each episode start
    s, cand_sa = featurizer(view, candidates, inputs)    # x_V(s) [1, d_s], x_Q(s, a_k) [1, K, d_sa]

With ``inputs`` None (or an :class:`~digiq.channels.Inputs` that is VLM-only) these are today's features,
f(s) and f(s, a_k) of the embed stage's extractor and recipe (``variant``, ``model``: its checkpoint folder, and
embed's ``layer``, ``pooling``, ``dtype``, ``device``); the screenshot is encoded once per step and every candidate
reuses the encoding. Other channel compositions (:mod:`digiq.channels`) are composed here too, in the canonical
order, from the view (goal, ``previous_actions``) and the previous step's screenshot, which the featurizer keeps
between calls of one episode (:meth:`reset` forgets it).

Every method of an evaluation plays the same seeds and sees the same candidates in the same state (its first step
always), so a state's features are computed once per run: with a ``cache`` folder, the features of a call are
stored under the sha256 of everything they depend on (the recipe, the channels, the previous screenshot, the
screenshot's bytes, goal, observation, DOM elements and candidate strings) and read back by any later call, in any
worker, with the same key. The cache is scratch space of one run (the evaluate stage removes it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq.errors import DigiqError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from digiq.envs.view import StepView
    from digiq.schema import Action


def vlm_only(inputs: Any) -> bool:
    """True for ``inputs`` None (a model saved before channels existed) or an Inputs reading the VLM feature alone."""
    if inputs is None:
        return True
    q, v = (inputs.get(k) if isinstance(inputs, dict) else getattr(inputs, k, None) for k in ("q", "v"))
    return list(q or []) == ["vlm"] and list(v or []) == ["vlm"]


class LiveFeaturizer:
    """x_V(s) [1, d_s] and x_Q(s, a_k) [1, K, d_sa] of a live state (module docstring)."""

    def __init__(self, variant: str, model: str, layer: int, pooling: str, dtype: str, device: str,
                 channels_model: str | None = None, cache: str | None = None):
        from digiq.extractor import build_extractor

        self.variant, self.model, self.channels_model = variant, model, channels_model
        self.extractor, self.model_hash, dtype_name = build_extractor(variant, model, layer=layer, pooling=pooling,
                                                                      dtype=dtype, device=device)
        self.recipe = json.dumps([variant, self.model_hash, layer, pooling, dtype_name, channels_model])
        self.cache = Path(cache) if cache else None
        self.previous_screenshot: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the episode so far (the previous screenshot): call at each episode start."""
        self.previous_screenshot = None

    def dims(self, inputs: Any = None) -> tuple[int, int]:
        """(d_s, d_sa): the widths of x_V and x_Q under ``inputs``."""
        _check_inputs(inputs)
        return self.extractor.dim_state, self.extractor.dim_candidate

    def __call__(self, view: StepView, actions: list[Action], inputs: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        from PIL import Image

        from digiq.extractor import featurize

        _check_inputs(inputs)
        if view.screenshot is None:
            raise DigiqError("a live step has no screenshot", field="screenshot")
        path = self.cache / f"{self.key(view, actions, inputs)}.npz" if self.cache else None
        cached = _load(path) if path is not None else None
        if cached is not None:
            f_s, f_sa = cached
        else:
            f_s, f_sa = featurize(self.extractor, Image.fromarray(view.screenshot), view.goal, view.observation, actions,
                                  view.elements)
            if path is not None:
                _store(path, f_s, f_sa)
        self.previous_screenshot = view.screenshot
        return torch.from_numpy(f_s).unsqueeze(0).float(), torch.from_numpy(f_sa).unsqueeze(0).float()

    def key(self, view: StepView, actions: list[Action], inputs: Any = None) -> str:
        """sha256 of everything the features of (view, actions) depend on (module docstring)."""
        from digiq.actions import format_action

        h = hashlib.sha256(self.recipe.encode())
        h.update(json.dumps([repr(inputs), view.goal, view.observation, [format_action(a) for a in actions]]).encode())
        h.update(json.dumps(view.elements, sort_keys=True, default=str).encode())
        previous = None if vlm_only(inputs) else self.previous_screenshot  # f(s), f(s, a) read this screen alone
        for image in (previous, view.screenshot):
            h.update(b"none" if image is None else f"{image.shape}{image.dtype}".encode() + image.tobytes())
        return h.hexdigest()


def _load(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    import numpy as np

    try:
        with np.load(path) as data:
            return data["f_s"], data["f_sa"]
    except (OSError, KeyError, ValueError):  # absent, or not (yet) a whole file: compute instead
        return None


def _store(path: Path, f_s: np.ndarray, f_sa: np.ndarray) -> None:
    """Write-then-rename, so that a reader in another worker never sees half a file."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.stem}.{os.getpid()}.part.npz")
    np.savez(part, f_s=f_s, f_sa=f_sa)
    os.replace(part, path)


def _check_inputs(inputs: Any) -> None:
    if not vlm_only(inputs):
        raise DigiqError(f"live features for the channels {inputs} are not composed yet (only the VLM feature alone)",
                         field="inputs")
