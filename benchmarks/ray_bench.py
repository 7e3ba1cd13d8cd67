"""Rollout throughput with the Ray executor against the local pool, same worker count, measured in the same run.

    python benchmarks/ray_bench.py                          # 2 tasks × 8 episodes, 2 workers, 2 rounds
    python benchmarks/ray_bench.py --tasks click-button,click-link,enter-text --episodes 12 --rounds 3

Each round runs the same recorded collection (π_β, screenshots and shards committed by the driver) twice into fresh
folders: once with ``executor: local`` (worker processes), once with ``executor: ray`` (one actor per browser on a
Ray started once for the whole benchmark on this machine; its start-up is reported apart, as a cluster would already
run). Both runs include starting their workers and browsers. Throughput = episodes / wall time; the two datasets of
a round are checked to be byte-identical. Order alternates between rounds, so drift in the machine's load hits both.

Prints one JSON object: per round both rates, ratio = ray / local, and the mean ratio (target ≥ 0.9 on one machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path


def collect(out: Path, tasks: list[str], episodes: int, workers: int, executor: str, seed: int) -> dict:
    from digiq.collection import behavior_run, plan
    from digiq.config import CollectParams, Params
    from digiq.envs.miniwob import BrowserConfig
    from digiq.envs.workers import run_units

    section = CollectParams(tasks=tasks, episodes_per_task=episodes, seed=seed, workers=workers, shard_episodes=max(1, episodes // 2),
                            out=str(out))
    run = behavior_run(section, out, Params().gamma, BrowserConfig(time_limit_s=section.time_limit_s))
    started = time.perf_counter()
    summaries = run_units(plan(section), run, workers, executor=executor)
    seconds = time.perf_counter() - started
    steps = sum(s["steps"] for s in summaries)
    return {"seconds": round(seconds, 2), "episodes": len(summaries), "steps": steps,
            "episodes_per_s": round(len(summaries) / seconds, 3), "steps_per_s": round(steps / seconds, 2)}


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="click-button,click-link")
    parser.add_argument("--episodes", type=int, default=8, help="episodes per task")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=max(args.workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    rounds = []
    try:
        for r in range(args.rounds):
            order = ("local", "ray") if r % 2 == 0 else ("ray", "local")
            with tempfile.TemporaryDirectory(prefix="digiq-ray-bench-") as tmp:
                result = {name: collect(Path(tmp) / name, tasks, args.episodes, args.workers, name, args.seed + r) for name in order}
                result["identical"] = tree_digest(Path(tmp) / "local") == tree_digest(Path(tmp) / "ray")
            result["ratio"] = round(result["ray"]["episodes_per_s"] / result["local"]["episodes_per_s"], 3)
            rounds.append(result)
    finally:
        ray.shutdown()
    ratios = [r["ratio"] for r in rounds]
    print(json.dumps({"tasks": tasks, "episodes_per_task": args.episodes, "workers": args.workers, "cpus": os.cpu_count(),
                      "load_avg_1m": round(os.getloadavg()[0], 2), "ray_start_s": round(ray_start_s, 2), "rounds": rounds,
                      "ratio_mean": round(sum(ratios) / len(ratios), 3), "target": 0.9}, indent=2))


if __name__ == "__main__":
    main()
