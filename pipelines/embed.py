"""DVC stage `embed`: frozen features f(s), f(s, a) for every state and candidate, per variant.

    data/raw + data/candidates.parquet + the variant's model ─▶ data/embeddings/<variant>/states.parquet
                                                              ─▶ data/embeddings/<variant>/candidates.parquet
                                                              ─▶ metrics/embed-<variant>.json

Variants: ``finetuned`` (the frozen fine-tuned VLM), ``off_the_shelf`` (the base VLM), ``no_vlm`` (raw
vision-tower features of the base VLM + an action encoding; see :mod:`digiq.extractor`). Interrupted runs resume
from ``<parts>/<variant>/`` (chunk files, git-ignored, outside the DVC output so `dvc repro` keeps them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digiq import embed as E
from digiq.atomic import write_json
from digiq.config import Params
from digiq.errors import DigiqError
from digiq.parallel import Ranks
from digiq.store import Dataset


@dataclass
class EmbedOutcome:
    metrics: dict[str, Any]
    out: Path
    is_main: bool = True  # False on the other processes of an `accelerate launch` run (they write nothing)


def run(params: Params, *, progress: bool = False, on_chunk: Callable[[int], None] | None = None) -> EmbedOutcome:
    """Embed the dataset (``collect.out``) for ``embed.variant``; write the tables and ``embed-<variant>.json``.

    Under ``accelerate launch`` the processes share the chunks (:func:`digiq.embed.embed_dataset`) and only the
    main one writes the tables and metrics (``EmbedOutcome.is_main``)."""
    from digiq.extractor import build_extractor
    from digiq.runtime import quiet_transformers, resolve_dtype, set_threads

    p = params.embed
    candidates = E.read_candidate_table(p.candidates)
    model = p.models.get(p.variant)
    if model is None:
        raise DigiqError(f"no model path for variant {p.variant!r}", field="embed.models")
    ranks = Ranks.from_environment()
    device = ranks.device(p.device)
    dtype = resolve_dtype(p.dtype, device, setting="embed.dtype")
    set_threads()
    quiet_transformers()
    started = time.perf_counter()
    extractor, model_hash, _ = build_extractor(p.variant, model, layer=p.layer, pooling=p.pooling,
                                               batch_size=p.batch_size, dtype=dtype, device=device, quantize=p.quantize)
    load_s = time.perf_counter() - started
    layer = p.layer if p.variant != "no_vlm" else -1
    quant = extractor.quantization
    settings = {"variant": p.variant, "pooling": p.pooling if p.variant != "no_vlm" else "mean+patch",
                "dtype": dtype.name, "marker": "patch", **({"quantize": quant.name} if quant.name != "none" else {})}
    out = Path(p.out) / p.variant
    result = E.embed_dataset(Dataset(params.collect.out), candidates, extractor, out, Path(p.parts) / p.variant,
                             model_hash=model_hash, layer=layer, chunk_states=p.chunk_states, settings=settings,
                             candidates_file=p.candidates, progress=progress, on_chunk=on_chunk, ranks=ranks)
    metrics = {
        "variant": p.variant, "model": model, "model_hash": model_hash, "layer": layer, **settings,
        "dtype_reason": dtype.reason, "quantize": quant.name, "quantize_reason": quant.reason, "states": result.states, "candidates": result.candidates,
        "d_state": result.dim_state, "d_candidate": result.dim_candidate, "computed_samples": result.computed,
        "screenshots_encoded": result.images, "chunks": result.chunks, "resumed_chunks": result.resumed_chunks,
        "seconds": round(result.seconds, 3), "load_seconds": round(load_s, 3),
        "samples_per_s": round(result.samples_per_s, 2), **result.extra,
    }
    if ranks.is_main:
        write_json(Path(p.metrics) / f"embed-{p.variant}.json", metrics)
    return EmbedOutcome(metrics=metrics, out=out, is_main=ranks.is_main)
