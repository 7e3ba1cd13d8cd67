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
"""

from __future__ import annotations

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
                 channels_model: str | None = None):
        from digiq.extractor import build_extractor

        self.variant, self.model, self.channels_model = variant, model, channels_model
        self.extractor, self.model_hash, _ = build_extractor(variant, model, layer=layer, pooling=pooling, dtype=dtype,
                                                             device=device)
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
        f_s, f_sa = featurize(self.extractor, Image.fromarray(view.screenshot), view.goal, view.observation, actions,
                              view.elements)
        self.previous_screenshot = view.screenshot
        return torch.from_numpy(f_s).unsqueeze(0).float(), torch.from_numpy(f_sa).unsqueeze(0).float()


def _check_inputs(inputs: Any) -> None:
    if not vlm_only(inputs):
        raise DigiqError(f"live features for the channels {inputs} are not composed yet (only the VLM feature alone)",
                         field="inputs")
