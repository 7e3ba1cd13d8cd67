"""DVC stage `embed`: frozen features f(s), f(s, a) for every state and candidate, per variant.

    data/raw + data/candidates.parquet + the variant's model ─▶ data/embeddings/<variant>/states.parquet
                                                              ─▶ data/embeddings/<variant>/candidates.parquet
                                                              ─▶ metrics/embed-<variant>.json

Variants: ``finetuned`` (the frozen fine-tuned VLM), ``off_the_shelf`` (the base VLM), ``no_vlm`` (raw
vision-tower features of the base VLM + an action encoding; see :mod:`digiq.embed`). Interrupted runs resume
from ``<parts>/<variant>/`` (chunk files, git-ignored, outside the DVC output so `dvc repro` keeps them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from digiq import embed as E
from digiq.atomic import write_json
from digiq.config import EmbedParams, Variant, validated  # noqa: F401 - validated is used by cli/embed.py
from digiq.errors import DigiqError
from digiq.parallel import Ranks
from digiq.store import Dataset



def embed_params(params: Any) -> EmbedParams:
    """The `embed` section of loaded params."""
    return params.embed


@dataclass
class EmbedOutcome:
    metrics: dict[str, Any]
    out: Path
    is_main: bool = True  # False on the other processes of an `accelerate launch` run (they write nothing)


def build_extractor(p: EmbedParams, ranks: Ranks | None = None) -> tuple[Any, str, str]:
    """(extractor, model hash, dtype name) for ``p.variant`` (on this process's device under `accelerate launch`)."""
    from digiq.runtime import quiet_transformers, set_threads

    set_threads()
    quiet_transformers()
    path = p.models.get(p.variant)
    if path is None:
        raise DigiqError(f"no model path for variant {p.variant!r}", field="embed.models")
    return E.build_extractor(p.variant, path, layer=p.layer, pooling=p.pooling, batch_size=p.batch_size,
                             dtype=p.dtype, device=(ranks or Ranks()).device(p.device))


def run(dataset: str | Path, p: EmbedParams, *, progress: bool = False, on_chunk: Any = None,
        extractor: tuple[Any, str, str] | None = None) -> EmbedOutcome:
    """Embed ``dataset`` for ``p.variant``; write the tables and ``metrics/embed-<variant>.json``.

    Under ``accelerate launch`` the processes share the chunks (:func:`digiq.embed.embed_dataset`) and only the
    main one writes the tables and metrics (``EmbedOutcome.is_main``)."""
    cand_path = Path(p.candidates)
    if not cand_path.is_file():
        raise DigiqError("missing candidate table (run `digiq candidates` first)", file=cand_path)
    try:
        candidates = pq.read_table(cand_path)
    except (pa.ArrowException, OSError) as exc:
        raise DigiqError(f"unreadable Parquet file ({exc})", file=cand_path) from None
    missing = [c for c in ("traj_id", "step_id", "cand_idx", "action") if c not in candidates.column_names]
    if missing:
        raise DigiqError("missing column", file=cand_path, field=missing[0])
    ranks = Ranks.from_environment()
    started = time.perf_counter()
    ex, mhash, dtype = extractor or build_extractor(p, ranks)
    load_s = time.perf_counter() - started
    layer = p.layer if p.variant != "no_vlm" else -1
    settings = {"variant": p.variant, "pooling": p.pooling if p.variant != "no_vlm" else "mean+patch",
                "dtype": dtype, "marker": "patch"}
    out = Path(p.out) / p.variant
    result = E.embed_dataset(Dataset(dataset), candidates, ex, out, Path(p.parts) / p.variant, model_hash=mhash,
                             layer=layer, chunk_states=p.chunk_states, settings=settings,
                             candidates_file=cand_path, progress=progress, on_chunk=on_chunk, ranks=ranks)
    metrics = {
        "variant": p.variant, "model": p.models.get(p.variant), "model_hash": mhash, "layer": layer, **settings,
        "states": result.states, "candidates": result.candidates, "d_state": result.dim_state,
        "d_candidate": result.dim_candidate, "computed_samples": result.computed,
        "screenshots_encoded": result.images, "chunks": result.chunks, "resumed_chunks": result.resumed_chunks,
        "seconds": round(result.seconds, 3), "load_seconds": round(load_s, 3),
        "samples_per_s": round(result.samples_per_s, 2), **result.extra,
    }
    if ranks.is_main:
        write_json(Path(p.metrics) / f"embed-{p.variant}.json", metrics)
    return EmbedOutcome(metrics=metrics, out=out, is_main=ranks.is_main)
