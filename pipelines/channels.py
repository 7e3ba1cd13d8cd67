"""DVC stage `channels`: the official critic's extra input channels, computed once for every state and candidate.

    data/raw + data/candidates.parquet + the base model's vision tower ─▶ data/channels/states.parquet
                                         + all-MiniLM-L6-v2 (PyPI)      ─▶ data/channels/candidates.parquet
                                                                        ─▶ metrics/channels.json

The tables are the channel views' sources (image_channel, goal_channel, prev_action_channel, action_channel), shared by
every embedding variant; what each channel holds: :mod:`digiq.channels`, :mod:`digiq.channel_tables`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq.atomic import write_json

if TYPE_CHECKING:
    from digiq.config import Params


def run(params: Params, *, progress: bool = False) -> dict[str, Any]:
    """Compute and write the channel tables (atomically, as one folder) and the stage metrics; the metrics."""
    from digiq.channel_tables import build_tables, write_tables
    from digiq.channels import VisionTower
    from digiq.store import Dataset
    from digiq.text_encoder import SentenceEncoder, describe

    p = params.channels
    started = time.perf_counter()
    dataset = Dataset(params.collect.out)  # before loading models: a bad path fails fast
    vision = VisionTower(p.model, dtype=p.dtype, device=p.device, batch_size=p.batch_size)
    encoder = SentenceEncoder(p.encoder, batch_size=p.batch_size)
    load_s = time.perf_counter() - started
    states, candidates, metrics = build_tables(dataset, Path(params.candidates.out), vision, encoder,
                                               batch_size=p.batch_size, progress=progress)
    write_tables(p.out, states, candidates)
    metrics = {**metrics, "model": p.model, "encoder": describe(encoder),
               "seconds": {**metrics["seconds"], "load_models": round(load_s, 3),
                           "total": round(time.perf_counter() - started, 3)}}
    write_json(p.metrics, metrics)
    return metrics
