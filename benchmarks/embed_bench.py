"""Embedding extraction, side by side in one run: the padded path against the packed one, float32 against int8
(and bf16 where the CPU has it), with FLOPs per candidate, achieved FLOP/s against this machine's matmul peak, and
the int8 features' cosine to the float32 ones.

    python benchmarks/embed_bench.py OUT.json --dataset data/raw --model models/finetuned [--states 32] [--k 64]
                                     [--layer 2] [--threads 2] [--repeats 3] [--dtypes float32,bfloat16]

Configurations (``name``: what runs):

- ``float32-padded``: the Hugging Face decoder on right-/left-padded rows, every token through every layer up to the
  read layer (the path before digiq/vlm/packed.py; it stays the path of training and of mean pooling);
- ``float32``: the packed last-token path (:mod:`digiq.vlm.packed`): no padding tokens, only the last token at the
  read layer;
- ``float32+int8``: the same with the language model's linear layers dynamically quantized to int8
  (:func:`digiq.vlm.load.quantize_language_model`), float32 activations;
- ``bfloat16`` (``--dtypes``): the packed path in bf16.

Each configuration runs :func:`digiq.embed.embed_chunk` on the first ``--states`` states with K candidates each
from π_β (everything the stage does per chunk: PNG decode, one vision encoding per screenshot, f(s), f(s, a) for
each distinct candidate); ``samples_per_s`` counts those distinct samples. ``mflops_per_candidate_forward``: one
state's f(s, a) forward (its distinct candidates, the screenshot already encoded) per candidate. Timings are interleaved (repeat r runs every configuration once) and the best of
``--repeats`` is kept, so load from other processes hits every configuration alike (``cpu_seconds``, the process's
CPU time, is the steadier measure on a loaded machine with ``--threads 1``: no thread waits for another; the
``*_cpu`` fields divide by it, against a matmul peak timed in CPU time too); the float32 matmul peak
(a square ``--matmul-n`` matmul, 2·n³ FLOPs) is measured before and after, the higher kept. ``flops`` are counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; it counts no attention scores on CPU and
no quantized matmuls, so the int8 row reuses the float32 packed count: the same work). Cosines compare each row's
f(s) and f(s, a) with ``float32-padded``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def matmul_gflops(dtype: torch.dtype, n: int, seconds: float, clock=time.perf_counter) -> float:  # noqa: ANN001
    """GFLOP/s of square n×n matmuls for ``seconds`` of ``clock`` (wall time, or ``time.process_time``: CPU time)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    count, start = 0, clock()
    while clock() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / (clock() - start) / 1e9


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def configurations(dtypes: list[str]) -> list[tuple[str, str, str, bool]]:
    """(name, dtype, quantize, packed) of each configuration measured."""
    out = [("float32-padded", "float32", "none", False), ("float32", "float32", "none", True),
           ("float32+int8", "float32", "int8", True)]
    return out + [(name, name, "none", True) for name in dtypes if name != "float32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--states", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--pooling", default="last")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--dtypes", default="float32", help="float32 always runs; add bfloat16 on CPUs with bf16 units")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.utils.flop_counter import FlopCounterMode

    from digiq import embed as E
    from digiq.actions import parse_action
    from digiq.candidates import sample_state
    from digiq.envs.behavior import BehaviorPolicy
    from digiq.extractor import VLMExtractor
    from digiq.runtime import quiet_transformers
    from digiq.store import Dataset
    from digiq.vlm import load_vlm

    quiet_transformers()
    dataset = Dataset(args.dataset)
    columns = ["traj_id", "step_id", "task", "goal", "observation", "elements", "screenshot", "screenshot_sha256", "action"]
    steps = dataset.table().select(columns).slice(0, args.states).to_pylist()
    policy = BehaviorPolicy()
    cands = {(r["traj_id"], int(r["step_id"])): list(enumerate(sample_state(policy, r, args.k, 0))) for r in steps}

    def run(extractor: VLMExtractor) -> E.ChunkResult:
        return E.embed_chunk(dataset, steps, cands, extractor, "bench", args.layer)

    first = steps[0]
    actions = list({a: parse_action(a) for _, a in cands[(first["traj_id"], int(first["step_id"]))]}.values())
    image = dataset.load_image(first["screenshot"], first["screenshot_sha256"])

    def candidate_flops(extractor: VLMExtractor) -> float:
        """FLOPs of one state's f(s, a) forward (its distinct candidates, screenshot encoded outside) per candidate."""
        tokens = extractor.encode([image])
        with FlopCounterMode(display=False) as counter:
            extractor.candidates(tokens, image.size, first["goal"], first["observation"], actions, None)
        return counter.get_total_flops() / len(actions)

    peak_before = matmul_gflops(torch.float32, args.matmul_n, 1.5)
    cpu_peak_before = matmul_gflops(torch.float32, args.matmul_n, 1.5, time.process_time)
    configs = configurations(args.dtypes.split(","))
    extractors, rows, features = {}, {}, {}
    for name, dtype, quantize, packed in configs:
        vlm = load_vlm(args.model, dtype=dtype, device="cpu", quantize=quantize)
        if not packed:
            vlm._packed = None  # the Hugging Face path on padded rows
        extractors[name] = VLMExtractor(vlm, args.layer, args.pooling)
        with FlopCounterMode(display=False) as counter:
            result = run(extractors[name])
        features[name] = (E.embedding_matrix(result.states), E.embedding_matrix(result.candidates))
        rows[name] = {"name": name, "dtype": dtype, "quantize": quantize, "packed": packed, "states": len(steps),
                      "k": args.k, "distinct_samples": result.computed, "candidates": result.computed - len(steps),
                      "screenshots": result.images, "flops_per_chunk": counter.get_total_flops(),
                      "mflops_per_candidate_forward": round(candidate_flops(extractors[name]) / 1e6, 2), "seconds": [],
                      "cpu_seconds": []}
    for key in ("flops_per_chunk", "mflops_per_candidate_forward"):  # quantized matmuls are not counted: same work
        rows["float32+int8"][key] = rows["float32"][key]
    for _ in range(args.repeats):  # interleaved: load from other processes hits every configuration alike
        for name in extractors:
            start, cpu = time.perf_counter(), time.process_time()
            run(extractors[name])
            rows[name]["seconds"].append(round(time.perf_counter() - start, 3))
            rows[name]["cpu_seconds"].append(round(time.process_time() - cpu, 3))
            print(f"{name}: {rows[name]['seconds'][-1]} s", file=sys.stderr, flush=True)
    peak = max(peak_before, matmul_gflops(torch.float32, args.matmul_n, 1.5))
    cpu_peak = max(cpu_peak_before, matmul_gflops(torch.float32, args.matmul_n, 1.5, time.process_time))
    ref_s, ref_c = features["float32-padded"]
    base = min(rows["float32-padded"]["seconds"])
    for name, row in rows.items():
        best = min(row["seconds"])
        cs, cc = cosines(features[name][0], ref_s), cosines(features[name][1], ref_c)
        achieved = row["flops_per_chunk"] / best / 1e9
        row.update(samples_per_s=round(row["distinct_samples"] / best, 2), speedup_vs_padded=round(base / best, 3),
                   samples_per_cpu_s=round(row["distinct_samples"] / min(row["cpu_seconds"]), 2),
                   cpu_speedup_vs_padded=round(min(rows["float32-padded"]["cpu_seconds"]) / min(row["cpu_seconds"]), 3),
                   gflops_per_sample=round(row["flops_per_chunk"] / row["distinct_samples"] / 1e9, 4),
                   achieved_gflops=round(achieved, 2), peak_gflops=round(peak, 2),
                   fraction_of_peak=round(achieved / peak, 4),
                   achieved_gflops_per_cpu_s=round(row["flops_per_chunk"] / min(row["cpu_seconds"]) / 1e9, 2),
                   peak_gflops_per_cpu_s=round(cpu_peak, 2),
                   fraction_of_peak_cpu=round(row["flops_per_chunk"] / min(row["cpu_seconds"]) / 1e9 / cpu_peak, 4),
                   cosine_to_fp32={"candidates_mean": float(cc.mean()), "candidates_min": float(cc.min()),
                                   "states_mean": float(cs.mean()), "states_min": float(cs.min())},
                   max_abs_diff_to_fp32=float(max(np.abs(features[name][0] - ref_s).max(),
                                                  np.abs(features[name][1] - ref_c).max())))
        print(json.dumps(row), flush=True)
    report = {
        "bench": "embed", "model": args.model, "layer": args.layer, "pooling": args.pooling, "threads": args.threads,
        "matmul_n": args.matmul_n, "peak_gflops_float32": round(peak, 2), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "rows": list(rows.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
