"""Embedding extraction throughput vs this machine's matmul peak, both measured in the same run.

    python benchmarks/embed_bench.py OUT.json --dataset data/raw --model models/base [--states 32] [--k 64]
                                     [--layer 2] [--threads 2] [--repeats 2] [--dtypes float32,bfloat16]

For each dtype:

- ``peak``: GFLOP/s of a square ``--matmul-n`` matmul (2·n³ FLOPs each) on the same threads, measured right
  before and right after the extraction rows (the higher is the peak: load from other processes on a shared
  machine only lowers it);
- ``embed``: :func:`digiq.embed.embed_chunk` on the first ``--states`` states of the dataset with K
  candidates each from π_β (everything the stage does per chunk: PNG decode, one vision encoding per
  screenshot, f(s), f(s, a) for each distinct candidate with the shared-prefix cache); samples/s counts the
  distinct samples computed (states + distinct state-action pairs), best of ``--repeats``;
- ``flops``: the FLOPs of one such chunk counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  attention, convolutions: the useful work), so achieved GFLOP/s = flops / best time, and
  ``fraction_of_peak`` = achieved / peak of the same dtype (target ≥ 0.40).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def matmul_gflops(dtype: torch.dtype, n: int, seconds: float) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


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
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.utils.flop_counter import FlopCounterMode

    from digiq import embed as E
    from digiq.extractor import VLMExtractor
    from digiq.candidates import sample_state
    from digiq.envs.behavior import BehaviorPolicy
    from digiq.runtime import quiet_transformers
    from digiq.store import Dataset
    from digiq.vlm import load_vlm

    quiet_transformers()
    dataset = Dataset(args.dataset)
    columns = ["traj_id", "step_id", "task", "goal", "observation", "elements", "screenshot", "screenshot_sha256", "action"]
    steps = dataset.table().select(columns).slice(0, args.states).to_pylist()
    policy = BehaviorPolicy()
    cands = {(r["traj_id"], int(r["step_id"])): list(enumerate(sample_state(policy, r, args.k, 0))) for r in steps}
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        peak_before = matmul_gflops(dtype, args.matmul_n, 1.5)
        vlm = load_vlm(args.model, dtype=dtype, device="cpu")
        extractor = VLMExtractor(vlm, args.layer, args.pooling)
        with FlopCounterMode(display=False) as counter:
            result = E.embed_chunk(dataset, steps, cands, extractor, "bench", args.layer)
        flops = counter.get_total_flops()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            E.embed_chunk(dataset, steps, cands, extractor, "bench", args.layer)
            times.append(time.perf_counter() - start)
        peak_after = matmul_gflops(dtype, args.matmul_n, 1.5)
        best = min(times)
        peak = max(peak_before, peak_after)
        achieved = flops / best / 1e9
        rows.append({
            "dtype": name, "states": len(steps), "k": args.k, "distinct_samples": result.computed,
            "screenshots": result.images, "seconds": [round(t, 3) for t in times],
            "samples_per_s": round(result.computed / best, 2), "states_per_s": round(len(steps) / best, 3),
            "flops_per_chunk": flops, "gflops_per_sample": round(flops / result.computed / 1e9, 4),
            "achieved_gflops": round(achieved, 2), "peak_gflops": round(peak, 2),
            "peak_gflops_before_after": [round(peak_before, 2), round(peak_after, 2)],
            "fraction_of_peak": round(achieved / peak, 4),
        })
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "bench": "embed", "model": args.model, "layer": args.layer, "pooling": args.pooling, "threads": args.threads,
        "matmul_n": args.matmul_n, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
