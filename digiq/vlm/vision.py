"""The vision side of a :class:`~digiq.vlm.model.VLM`: the tower's selected features for pixel values, a memory of
the last call (the tower is frozen: the same pixels give the same features), and whether two loaded VLMs turn a
screenshot into the same features, so that one tower pass can serve both (live evaluation: f(s) and the image
channel v(s), :class:`~digiq.channels.VisionTower`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from digiq.vlm.model import VLM


def tower_features(tower: Any, pixel_values: torch.Tensor, *, device: str, dtype: torch.dtype, feature_layer: Any,
                   strategy: str) -> torch.Tensor:
    """``[B, n_image_tokens, vision_hidden]``: the hidden states at ``feature_layer`` (one index or several,
    concatenated), without the CLS token under the "default" select strategy. Without gradients."""
    import torch

    with torch.no_grad():
        out = tower(pixel_values.to(device, dtype), output_hidden_states=True, return_dict=True)
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        selected = [out.hidden_states[i] for i in layers]
        if strategy == "default":
            selected = [h[:, 1:] for h in selected]
        return torch.cat(selected, dim=-1)


class LastCall:
    """The features of the last pixel values seen, returned again for the same pixels (by content and shape)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: Any = None

    def __call__(self, pixel_values: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = hashlib.sha256(pixel_values.detach().cpu().numpy().tobytes()).hexdigest() + str(tuple(pixel_values.shape))
        if key != self.key:
            self.key, self.value = key, compute()
        return self.value


def same_vision(a: VLM, b: VLM) -> bool:
    """Whether ``a`` and ``b`` give the same vision features: the same pre-processing, dtype, device and selected
    layers, and vision towers with equal weights (fine-tuning leaves the tower frozen)."""
    import torch

    if any(getattr(a, name) != getattr(b, name) for name in ("dtype", "device", "strategy", "feature_layer", "pad_fill")):
        return False
    if a.processor.image_processor.to_dict() != b.processor.image_processor.to_dict():
        return False
    mine, theirs = a.vision_tower.state_dict(), b.vision_tower.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
