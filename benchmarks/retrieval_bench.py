"""Feature-store benchmarks: online retrieval latency and point-in-time training-set build.

    python benchmarks/retrieval_bench.py [--states 2000] [--k 64] [--dim 384] [--reps 1000] [--json out.json]

On synthetic tables with the embed stage's exact schema (random float32 vectors, fixed seed), in a
temporary copy of the Feast repository:

1. materialize (apply + 4 views into SQLite), wall time;
2. online retrieval of the K candidate embeddings of one state through Feast (random states,
   p50/p99 over --reps calls, result as a float32 [K, d] array) beside direct reads of the same
   rows measured in the same run: DuckDB over the Parquet file, pyarrow with a filter, and DuckDB
   on an in-memory table;
3. the critic's training set for every state (`training_frame`: three get_historical_features
   calls) — wall time, rows, and a full comparison with the source tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": len(ms)}


def time_calls(fn: Callable[[str], np.ndarray], keys: list[str], expected: Callable[[str], np.ndarray], warmup: int = 10) -> dict[str, float]:
    """Latency of fn(key) over keys (after a warm-up), checking every answer against the source rows."""
    for key in keys[:warmup]:
        fn(key)
    samples = []
    for key in keys:
        start = time.perf_counter()
        result = fn(key)
        samples.append(time.perf_counter() - start)
        if not np.array_equal(result, expected(key)):
            raise AssertionError(f"wrong rows for {key}")
    return percentiles(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", type=int, default=2000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--reps", type=int, default=1000, help="online calls timed (Feast and in-memory DuckDB)")
    parser.add_argument("--file-reps", type=int, default=100, help="calls timed for the reads that scan the Parquet file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import duckdb

    from digiq import store_client as client
    from digiq.feature_sources import FeatureInputs
    from digiq.feature_write import materialize

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import project_params, write_synthetic_sources  # the tests' synthetic sources

    results: dict = {"config": vars(args) | {"json": str(args.json) if args.json else None}}
    work = Path(tempfile.mkdtemp(prefix="retrieval-bench-"))
    try:
        shutil.copytree(ROOT / "features", work / "features", ignore=shutil.ignore_patterns("data", "__pycache__"))
        start = time.perf_counter()
        paths = write_synthetic_sources(work / "data", n_states=args.states, k=args.k, dim=args.dim, seed=args.seed)
        results["synthetic_write_s"] = time.perf_counter() - start
        results["candidates_parquet_mb"] = paths["candidates"].stat().st_size / 2**20
        results["materialize"] = materialize(FeatureInputs.from_params(project_params(work)), progress=True)
        results["online_store_mb"] = (work / "features" / "data" / "finetuned" / "online_store.db").stat().st_size / 2**20

        # ---- source rows, for checking every answer
        cands = pq.read_table(paths["candidates"], columns=["state_key", "cand_idx", "embedding"]).sort_by([("state_key", "ascending"), ("cand_idx", "ascending")])
        state_keys = np.asarray(cands["state_key"].to_pylist()[:: args.k], dtype=object)
        block = np.asarray(cands["embedding"].combine_chunks().flatten(), dtype=np.float32).reshape(len(state_keys), args.k, args.dim)
        row_of = {key: i for i, key in enumerate(state_keys)}
        expected = lambda key: block[row_of[key]]  # noqa: E731
        rng = np.random.default_rng(args.seed)
        keys = [str(k) for k in rng.choice(state_keys, size=args.reps)]

        # ---- online: Feast (SQLite online store)
        store = client.open_store(work / "features", "finetuned")
        with client.quiet_feast():
            online = time_calls(lambda key: client.online_candidates(store, key)["embedding"], keys, expected)
            t_state = time_calls(lambda key: client.online_state(store, *key.split("/"), candidates=True)["candidates"]["embedding"],
                                 keys[: args.file_reps], expected)
        results["online_feast_candidates"] = online
        results["online_feast_state_plus_candidates"] = t_state

        # ---- direct reads of the same rows
        con = duckdb.connect()
        sql = f"SELECT embedding FROM read_parquet('{paths['candidates']}') WHERE state_key = ? ORDER BY cand_idx"
        as_block = lambda table: np.asarray(table["embedding"].combine_chunks().flatten(), dtype=np.float32).reshape(-1, args.dim)  # noqa: E731
        results["direct_duckdb_parquet"] = time_calls(lambda key: as_block(con.sql(sql, params=[key]).to_arrow_table()), keys[: args.file_reps], expected)
        results["direct_pyarrow_parquet_filter"] = time_calls(
            lambda key: as_block(pq.read_table(paths["candidates"], columns=["cand_idx", "embedding"], filters=[("state_key", "==", key)]).sort_by("cand_idx")),
            keys[: args.file_reps], expected)
        start = time.perf_counter()
        con.execute(f"CREATE TABLE cands AS SELECT state_key, cand_idx, embedding FROM read_parquet('{paths['candidates']}') ORDER BY state_key, cand_idx")
        con.execute("CREATE INDEX cands_state ON cands (state_key)")
        results["direct_duckdb_memory_load_s"] = time.perf_counter() - start
        mem_sql = "SELECT embedding FROM cands WHERE state_key = ? ORDER BY cand_idx"
        results["direct_duckdb_memory_indexed"] = time_calls(lambda key: as_block(con.sql(mem_sql, params=[key]).to_arrow_table()), keys, expected)

        # ---- point-in-time training set for every state
        for attempt in ("first", "second"):
            start = time.perf_counter()
            frame = client.training_frame(store)
            results[f"training_frame_{attempt}"] = {"wall_s": time.perf_counter() - start, "rows": len(frame),
                                                    "candidate_rows": int(frame.candidate_mask.sum()), **frame.timings}
        order = np.argsort(frame.state_key)
        states = pq.read_table(paths["states"], columns=["state_key", "embedding"]).sort_by("state_key")
        state_block = np.asarray(states["embedding"].combine_chunks().flatten(), dtype=np.float32).reshape(-1, args.dim)
        results["training_frame_equals_sources"] = bool(
            np.array_equal(frame.state_key[order], np.asarray(states["state_key"].to_pylist(), dtype=object))
            and np.array_equal(frame.state[order], state_block)
            and np.array_equal(frame.candidates[order], block)  # block rows are in sorted state_key order too
        )
        start = time.perf_counter()
        con.sql(f"""SELECT c.state_key, list(c.embedding ORDER BY c.cand_idx) FROM read_parquet('{paths['candidates']}') c
                        JOIN read_parquet('{paths['states']}') s USING (state_key) GROUP BY c.state_key""").to_arrow_table()
        results["direct_duckdb_join_candidates_s"] = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


def report(r: dict) -> None:
    cfg = r["config"]
    print(f"\n{cfg['states']} states × {cfg['k']} candidates, d = {cfg['dim']}  "
          f"(candidates.parquet {r['candidates_parquet_mb']:.0f} MiB, online store {r['online_store_mb']:.0f} MiB)")
    t = r["materialize"]["timings_s"]
    print(f"materialize: total {t['total']:.1f} s (import feast {t['import_feast']:.1f} s, apply {t['apply']:.2f} s, "
          f"candidate blocks {t['materialize_candidate_block']:.1f} s, states {t['materialize_state_embedding']:.1f} s)")
    print(f"\n{'online read of one state’s K candidate embeddings':58s} {'p50 ms':>8s} {'p99 ms':>8s} {'n':>6s}")
    for name in ("online_feast_candidates", "online_feast_state_plus_candidates", "direct_duckdb_memory_indexed",
                 "direct_duckdb_parquet", "direct_pyarrow_parquet_filter"):
        s = r[name]
        print(f"  {name:56s} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['n']:6d}")
    print(f"  (in-memory DuckDB table load + index: {r['direct_duckdb_memory_load_s']:.1f} s)")
    for attempt in ("first", "second"):
        f = r[f"training_frame_{attempt}"]
        print(f"\ntraining_frame ({attempt} call): {f['wall_s']:.2f} s for {f['rows']} rows, {f['candidate_rows']} candidate rows "
              f"(state features {f['state_features_s']:.2f} s, next states {f['next_state_s']:.2f} s, candidates {f['candidates_s']:.2f} s)")
    print(f"training frame equals the source tables: {r['training_frame_equals_sources']}; "
          f"direct DuckDB join of the candidates: {r['direct_duckdb_join_candidates_s']:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
