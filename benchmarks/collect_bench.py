"""Collection throughput against bare ``env.step`` throughput, measured in the same run.

    python benchmarks/collect_bench.py                      # 8 default tasks × 10 episodes, 2 workers
    python benchmarks/collect_bench.py --episodes 20 --rounds 2

1. collect: ``digiq collect``'s pipeline (π_β, per-episode page reload, PNG + hashes, shards, GX checks
   excluded from the timing) with W worker processes; throughput = env steps / collection wall time
   (browser start-up included; STATUS_TASK_COMPLETE actions, which never reach the browser, excluded).
2. bare: W processes each running a plain ``gymnasium.make("miniwob/<task>-v1")`` (miniwob's own
   driver and defaults, no reload, no settle) that replays the *same* episodes — reset(seed) and the
   collected actions mapped to miniwob actions — with no policy, no encoding, no writing; throughput =
   env.step calls / wall time (browser start-up included).
3. bare_reload: the same with miniwob's ``refresh_freq=1``, i.e. the per-episode page reload that
   `collect` needs for reproducible episodes (without it, state leaks from one episode into the next).

Prints one JSON object; the target is ratio = collect / bare ≥ 0.8 (ratio_vs_bare_reload isolates the
cost of everything but the reload).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

DEFAULT_TASKS = ["click-button", "click-link", "click-tab-2", "click-checkboxes", "choose-list", "enter-text", "login-user", "use-autocomplete"]


def run_collect(out: Path, tasks: list[str], episodes: int, workers: int, seed: int, noise: float, max_steps: int,
                fresh_page: bool = True) -> dict:
    from digiq.collection import SOURCE, plan
    from digiq.config import CollectParams, Params
    from digiq.envs.miniwob import BrowserConfig
    from digiq.envs.policy import PolicySpec
    from digiq.envs.workers import Recording, RunConfig, run_units

    config = CollectParams(tasks=tasks, episodes_per_task=episodes, seed=seed, workers=workers, max_steps=max_steps,
                           noise=noise, out=str(out))
    run = RunConfig(policy=PolicySpec("behavior", {"noise": noise}), seed=seed, max_steps=max_steps, history=config.history,
                    browser=BrowserConfig(time_limit_s=config.time_limit_s, fresh_page=fresh_page),
                    record=Recording(str(out), gamma=Params().gamma, source=SOURCE))
    started = time.perf_counter()
    summaries = run_units(plan(config), run, workers)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "episodes": len(summaries), "transitions": sum(s["steps"] for s in summaries)}


def episodes_to_replay(dataset: Path) -> list[tuple[str, int, list[str]]]:
    """(task, episode seed, AutoUI action strings) per collected episode, in (task, index) order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in sorted((dataset / "steps").glob("*.parquet"))])
    rows = sorted(table.select(["traj_id", "step_id", "task", "seed", "action"]).to_pylist(), key=lambda r: (r["traj_id"], r["step_id"]))
    episodes: dict[str, tuple[str, int, list[str]]] = {}
    for row in rows:
        episodes.setdefault(row["traj_id"], (row["task"], row["seed"], []))[2].append(row["action"])
    return list(episodes.values())


def _bare_worker(episodes: list[tuple[str, int, list[str]]], refresh: bool, result: mp.Queue) -> None:
    import gymnasium
    import miniwob  # noqa: F401

    from digiq.actions import parse_action
    from digiq.envs.miniwob import DEBIAN_CHROMEDRIVER, DEBIAN_CHROMIUM
    from digiq.envs.page import to_env_action

    os.environ.setdefault("MINIWOB_CHROME_BINARY", DEBIAN_CHROMIUM)
    os.environ.setdefault("MINIWOB_CHROMEDRIVER", DEBIAN_CHROMEDRIVER)
    steps, env, env_task = 0, None, None
    try:
        for task, seed, actions in episodes:
            if task != env_task:
                if env is not None:
                    env.close()
                env, env_task = gymnasium.make(f"miniwob/{task}-v1", refresh_freq=int(refresh)), task
            env.reset(seed=seed)
            config = env.unwrapped.action_space_config
            for text in actions:
                mapped = to_env_action(parse_action(text), 160.0, 210.0)
                if mapped.kind == "COMPLETE":
                    break
                action = {"action_type": config.action_types.index(mapped.kind)}
                if mapped.kind.endswith("_COORDS"):
                    action["coords"] = [mapped.left, mapped.top]
                elif mapped.kind == "TYPE_TEXT":
                    action["text"] = mapped.text
                elif mapped.kind == "PRESS_KEY":
                    action["key"] = list(config.allowed_keys).index(mapped.key)
                _, _, done, _, _ = env.step(action)
                steps += 1
                if done:
                    break
    finally:
        if env is not None:
            env.close()
    result.put(steps)


def run_bare(episodes: list[tuple[str, int, list[str]]], workers: int, refresh: bool = False) -> dict:
    """Replay the episodes in ``workers`` processes, tasks split as collect's units are (by task blocks).

    ``refresh``: miniwob's own ``refresh_freq=1`` (reload the page before every episode), the same
    per-episode reload `collect` does for reproducible episodes.
    """
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    tasks = sorted({task for task, _, _ in episodes})
    shares = [[e for e in episodes if tasks.index(e[0]) % workers == w] for w in range(workers)]
    started = time.perf_counter()
    procs = [ctx.Process(target=_bare_worker, args=(share, refresh, result)) for share in shares]
    for p in procs:
        p.start()
    steps = sum(result.get() for _ in procs)
    for p in procs:
        p.join()
    return {"seconds": time.perf_counter() - started, "env_steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="collect/bare pairs (alternating, fresh dataset each)")
    parser.add_argument("--keep-page", action="store_true",
                        help="collect without reloading the page between episodes (shows what the reload costs; not deterministic)")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="digiq-bench-") as tmp:
            out = Path(tmp) / "data"
            collected = run_collect(out, tasks, args.episodes, args.workers, args.seed + r, args.noise, args.max_steps,
                                    fresh_page=not args.keep_page)
            episodes = episodes_to_replay(out)
            completes = sum(1 for _, _, actions in episodes for a in actions if '"STATUS_TASK_COMPLETE"' in a)
            collected["env_steps"] = collected["transitions"] - completes
            bare = run_bare(episodes, args.workers)
            bare_reload = run_bare(episodes, args.workers, refresh=True)
        rate = collected["env_steps"] / collected["seconds"]
        bare["env_steps_per_s"] = round(bare["env_steps"] / bare["seconds"], 2)
        bare_reload["env_steps_per_s"] = round(bare_reload["env_steps"] / bare_reload["seconds"], 2)
        rounds.append({"collect": {**collected, "env_steps_per_s": round(rate, 2)}, "bare": bare, "bare_reload": bare_reload,
                       "ratio": round(rate / bare["env_steps_per_s"], 3),
                       "ratio_vs_bare_reload": round(rate / bare_reload["env_steps_per_s"], 3)})
    ratios = [r["ratio"] for r in rounds]
    ratios_reload = [r["ratio_vs_bare_reload"] for r in rounds]
    print(json.dumps({"tasks": tasks, "episodes_per_task": args.episodes, "workers": args.workers, "cpus": os.cpu_count(),
                      "fresh_page": not args.keep_page,
                      "load_avg_1m": round(os.getloadavg()[0], 2), "rounds": rounds, "ratio_mean": round(sum(ratios) / len(ratios), 3),
                      "ratio_vs_bare_reload_mean": round(sum(ratios_reload) / len(ratios_reload), 3),
                      "target": 0.8}, indent=2))


if __name__ == "__main__":
    main()
