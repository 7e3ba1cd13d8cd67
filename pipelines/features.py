"""DVC stage `features`: serve the frozen embeddings, ε-labels and rewards through Feast.

    data/embeddings/<variant>/{states,candidates}.parquet ─┐
    data/candidates.parquet (semantic keys, draws)        ─┤ check ─▶ data/features/<variant>/ (derived sources)
    data/labels.parquet, data/raw (step table)            ─┘       ─▶ feast apply ─▶ materialize (online store)
                                                                   ─▶ metrics/features.json

The Feast repository is ``features/`` (definitions in ``features/digiq_feature_repo.py``, from
:mod:`digiq.feature_contract`). Training sets read the derived sources (a DVC output) through the offline store;
the registry and online store in ``features/data/<variant>/`` are run-time state for online reads (git-ignored: the
registry changes on every apply). Checks and derivations: :mod:`digiq.feature_sources`; the write path:
:mod:`digiq.feature_write`; readers: :mod:`digiq.store_client`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from digiq.atomic import write_json

if TYPE_CHECKING:
    from digiq.config import Params


def run(params: Params, *, progress: bool = False) -> dict[str, Any]:
    """Check the sources, derive the state-keyed tables, `feast apply`, materialize; write and return the metrics."""
    from digiq.feature_sources import FeatureInputs
    from digiq.feature_write import materialize

    metrics = materialize(FeatureInputs.from_params(params), progress=progress)
    write_json(params.features.metrics, metrics)
    return metrics
