"""Fine-tuning throughput (samples/s), fp32 and bf16 side by side, on real transitions, against the matmul peak.

    python benchmarks/finetune_bench.py --dataset data/raw --labels data/labels.parquet --base models/base

Vision features are cached once (as the stage does); each dtype then runs ``--steps`` optimizer steps of the
training loop (projector + language model forward/backward + AdamW) after ``--warmup`` steps, on a fresh
LoRA (or full) model. bf16 is autocast over fp32 master weights, as in the stage. The FLOPs of one step (forward
and backward) are counted by ``torch.utils.flop_counter.FlopCounterMode``; achieved GFLOP/s = FLOPs per sample ×
samples/s, against a square ``--matmul-n`` matmul of the same dtype measured before and after (the higher kept),
as benchmarks/embed_bench.py reports extraction (the ``*_cpu_s`` fields in CPU time: steadier on a loaded machine
with ``--threads 1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="data/raw")
    ap.add_argument("--labels", default="data/labels.parquet")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, comma-separated (bf16 takes minutes per step on CPUs without avx512_bf16/amx)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from embed_bench import matmul_gflops
    from torch.utils.flop_counter import FlopCounterMode

    from digiq import finetune as F
    from digiq.config import FinetuneParams
    from digiq.finetune_trainer import Trainer
    from digiq.labels import read_labels
    from digiq.runtime import choose_dtype, cpu_flags, seed_everything, set_threads
    from digiq.store import Dataset
    from digiq.vlm.load import load_vlm, model_info
    from digiq.vlm.model import VLM

    threads = set_threads(args.threads)
    data = Dataset(args.dataset)
    n = args.batch_size * (args.steps + args.warmup)
    examples = F.load_examples(data, read_labels(args.labels).iloc[:n], args.labels,
                               order=model_info(args.base)["prompt_order"])
    rows = np.arange(len(examples))
    results = {}
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        peak = matmul_gflops(dtype, args.matmul_n, 1.5)
        cpu_peak = matmul_gflops(dtype, args.matmul_n, 1.5, time.process_time)
        seed_everything(0)
        vlm = load_vlm(args.base, dtype="float32", device="cpu")
        t0 = time.perf_counter()
        features = F.vision_cache(vlm, data, examples.images, dtype)
        vision_rate = len(examples.images) / (time.perf_counter() - t0)
        spec = FinetuneParams(mode=args.mode, batch_size=args.batch_size, lora_r=8, lora_alpha=16)  # as measured
        model = F.make_trainable(vlm, spec)
        trainer = Trainer(VLM(model, vlm.processor), model, features, examples, rows, rows[:1], spec, dtype)
        batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
        for i, b in enumerate(batches[:args.warmup]):
            with FlopCounterMode(display=False) if i == 0 else contextlib.nullcontext() as counter:
                trainer.train_step(b)
            if i == 0:
                flops_per_sample = counter.get_total_flops() / len(b)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for b in batches[args.warmup:]:
            trainer.train_step(b)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        samples = sum(len(b) for b in batches[args.warmup:])
        peak = max(peak, matmul_gflops(dtype, args.matmul_n, 1.5))
        cpu_peak = max(cpu_peak, matmul_gflops(dtype, args.matmul_n, 1.5, time.process_time))
        achieved = flops_per_sample * samples / seconds / 1e9
        results[str(dtype).removeprefix("torch.")] = {
            "train_samples_per_s": round(samples / seconds, 2), "vision_images_per_s": round(vision_rate, 2),
            "gflops_per_sample": round(flops_per_sample / 1e9, 4), "achieved_gflops": round(achieved, 2),
            "peak_gflops": round(peak, 2), "fraction_of_peak": round(achieved / peak, 4),
            "train_samples_per_cpu_s": round(samples / cpu_seconds, 2),
            "achieved_gflops_per_cpu_s": round(flops_per_sample * samples / cpu_seconds / 1e9, 2),
            "peak_gflops_per_cpu_s": round(cpu_peak, 2),
            "fraction_of_peak_cpu": round(flops_per_sample * samples / cpu_seconds / 1e9 / cpu_peak, 4)}
    bf16_flags = sorted({"avx512_bf16", "amx_bf16"} & cpu_flags())
    summary = {"mode": args.mode, "batch_size": args.batch_size, "steps": args.steps, "threads": threads,
               "cpu_bf16_flags": bf16_flags, "auto_dtype": str(choose_dtype("cpu")).removeprefix("torch."),
               "results": results}
    print(f"fine-tuning throughput ({args.mode}, batch {args.batch_size}, {threads} threads, "
          f"bf16 flags: {bf16_flags or 'none'}, auto picks {summary['auto_dtype']})")
    print(f"{'dtype':<10}{'train samples/s':>18}{'vision images/s':>18}")
    for name, r in results.items():
        print(f"{name:<10}{r['train_samples_per_s']:>18}{r['vision_images_per_s']:>18}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
