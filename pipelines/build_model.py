"""Stage `model build`: write the embedded default VLM (a Hugging Face checkpoint folder) atomically.

Deterministic: the same settings give byte-identical weights, so DVC caches the output.
"""

from __future__ import annotations

import json
from pathlib import Path

from digiq.config import Params


def run(params: Params, *, progress: bool = False) -> dict:
    """Build the default VLM into ``model.base`` (replaced atomically) and return its build record."""
    from digiq.runtime import set_threads
    from digiq.vlm.build import BUILD_FILE, build_default_vlm

    m = params.model
    set_threads()
    path = build_default_vlm(Path(m.base), image_size=m.image_size, seed=m.seed, prompt_order=m.prompt_order,
                             text_model=m.text_model, tap_target=m.tap_target, field_values=m.field_values)
    return json.loads((path / BUILD_FILE).read_text())
