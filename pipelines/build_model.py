"""Stage `model build`: write the embedded default VLM (a Hugging Face checkpoint folder) atomically.

Deterministic: the same image size and seed give byte-identical weights, so DVC caches the output.
"""

from __future__ import annotations

import json
from pathlib import Path


def run(out: Path, image_size: int = 112, seed: int = 0, prompt_order: str = "image_first", text_model: str = "llama",
        tap_target: bool = False, field_values: bool = False) -> dict:
    """Build the default VLM into ``out`` (replaced atomically) and return its build record."""
    from digiq.runtime import set_threads
    from digiq.vlm.build import BUILD_FILE, build_default_vlm

    set_threads()
    path = build_default_vlm(Path(out), image_size=image_size, seed=seed, prompt_order=prompt_order,
                              text_model=text_model, tap_target=tap_target, field_values=field_values)
    return json.loads((path / BUILD_FILE).read_text())
