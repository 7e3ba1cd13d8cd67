"""The VLM layer: the embedded default LLaVA (built offline), loading any LLaVA-style checkpoint, prompts,
image inputs and the cached fast paths for f(s) and f(s, a).

    from digiq.vlm import load_vlm, build_default_vlm
    vlm = load_vlm("models/base")                       # VLM (digiq.vlm.model)
    tokens = vlm.encode_images([screenshot])            # once per state
    feats = vlm.forward_features(tokens, prompts, actions, layer=2, image_sizes=[screenshot.size])

Heavy libraries load on first use, not on ``import digiq.vlm``.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "load_vlm": "digiq.vlm.load",
    "model_info": "digiq.vlm.load",
    "build_default_vlm": "digiq.vlm.build",
    "VLM": "digiq.vlm.model",
    "VLMOutput": "digiq.vlm.model",
    "build_prompt": "digiq.vlm.prompts",
    "build_prompts": "digiq.vlm.prompts",
    "state_prompt": "digiq.vlm.prompts",
    "pad_to_square": "digiq.vlm.inputs",
    "draw_tap_marker": "digiq.vlm.inputs",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'digiq.vlm' has no attribute {name!r}")
