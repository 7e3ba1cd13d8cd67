"""Per-stage wall time and peak memory of a `dvc repro` — run here, or one already running (``--attach``).

    python benchmarks/stage_profile.py OUT.json -- dvc repro            # run the command and watch it
    python benchmarks/stage_profile.py OUT.json --attach PID            # watch a running `make repro` / `dvc repro`

Every ``--interval`` seconds the whole process tree under the watched process is sampled. Each
``digiq <stage> …`` process (DVC starts one per stage) is one stage; its memory is the proportional set
size (PSS: shared pages split between the processes sharing them) summed over it and its descendants —
browser workers, chromium, chromedriver included. Per stage: wall time (first to last sample that saw it,
± one interval), peak tree PSS and peak PSS of the digiq process alone. Also writes a markdown table
next to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

MIB = 2**20


def stage_name(cmdline: list[str]) -> str | None:
    """``digiq actor --method bc`` → ``actor --method bc``; None for other processes."""
    for i, part in enumerate(cmdline):
        if Path(part).name == "digiq" and i + 1 < len(cmdline):
            return " ".join(cmdline[i + 1:])
    return None


def memory(proc: psutil.Process) -> int:
    try:
        info = proc.memory_full_info()
        return int(getattr(info, "pss", info.rss))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def sample(root: psutil.Process, stages: dict[str, dict], now: float) -> None:
    try:
        procs = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            name = stage_name(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if name is None or (proc.parent() and stage_name(proc.parent().cmdline()) == name):
            continue  # not a stage, or a worker re-executing the same command line
        own = memory(proc)
        try:
            tree = own + sum(memory(child) for child in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            tree = own
        row = stages.setdefault(name, {"first_s": now, "last_s": now, "peak_tree_mib": 0.0, "peak_own_mib": 0.0})
        row["last_s"] = now
        row["peak_tree_mib"] = max(row["peak_tree_mib"], round(tree / MIB, 1))
        row["peak_own_mib"] = max(row["peak_own_mib"], round(own / MIB, 1))


def markdown(stages: dict[str, dict], interval: float) -> str:
    lines = [f"| stage | wall time (± {interval:g} s) | peak memory, stage + children (PSS) | peak memory, stage process |",
             "|---|---|---|---|"]
    for name, row in stages.items():
        wall = row["last_s"] - row["first_s"]
        lines.append(f"| `digiq {name}` | {wall / 60:.1f} min ({wall:.0f} s) | {row['peak_tree_mib'] / 1024:.2f} GiB "
                     f"| {row['peak_own_mib'] / 1024:.2f} GiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--attach", type=int, default=None, help="watch this running process (and its descendants)")
    ap.add_argument("--interval", type=float, default=2.0)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = ap.parse_args(argv[:split]), argv[split + 1:]  # -- COMMAND: run it and watch it
    if (args.attach is None) == (not command):
        ap.error("give either --attach PID or -- COMMAND")
    child = subprocess.Popen(command) if command else None
    root = psutil.Process(child.pid if child else args.attach)
    started, stages = time.perf_counter(), {}
    while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
        sample(root, stages, time.perf_counter() - started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"interval_s": args.interval, "stages": stages}, indent=2))
        time.sleep(args.interval)
    total = time.perf_counter() - started
    args.out.write_text(json.dumps({"interval_s": args.interval, "total_s": round(total, 1), "stages": stages}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(stages, args.interval) + f"\nTotal: {total / 60:.1f} min.\n")
    print(markdown(stages, args.interval))
    if child is not None:
        sys.exit(child.wait())


if __name__ == "__main__":
    main()
