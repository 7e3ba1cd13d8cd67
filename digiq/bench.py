"""`digiq bench`: run the benchmarks of benchmarks/ one after the other and gather their results.

Each benchmark is its own script (so it can be run and read alone) that measures its ratio side by side in
one run; this module runs the chosen ones as subprocesses, reads the JSON each writes, and writes
``benchmarks/results.json`` (everything) plus ``benchmarks/results.md`` (one headline row per bar). A
per-stage profile of a `dvc repro` (benchmarks/stage_profile.py: wall time and peak memory) is added
when its JSON file exists.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digiq.errors import DigiqError

Headline = Callable[[dict[str, Any]], list[tuple[str, str, str]]]  # (what, measured, target)


@dataclass(frozen=True)
class Bench:
    script: str
    args: Callable[[Path, bool], list[str]]  # (json path, quick) → command-line arguments
    headline: Headline
    needs: tuple[str, ...] = ()  # project paths that must exist (stage outputs)
    stdout_json: bool = False  # the script prints its JSON instead of writing it


def compute_dtypes() -> str:
    """float32, plus bfloat16 where the CPU has bf16 instructions (elsewhere bf16 is emulated: docs/benchmarks.md)."""
    from digiq.runtime import cpu_flags

    return "float32,bfloat16" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "float32"


def _collect_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [("collection env steps/s vs bare miniwob env.step (same episodes, same run)", f"{r['ratio_mean']:.3f}", "≥ 0.8")]


def _embed_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for row in r["rows"]:
        name, cos = row["name"], row["cosine_to_fp32"]
        rows += [(f"extraction {name}: samples/s ({row['speedup_vs_padded']:.2f}× float32-padded in the same run; "
                  f"{row['achieved_gflops']:.0f} of {row['peak_gflops']:.0f} GFLOP/s fp32 matmul peak = "
                  f"{row['fraction_of_peak']:.2f}; {row['mflops_per_candidate_forward']:.1f} MFLOP per candidate forward)",
                  f"{row['samples_per_s']:.0f}", "≥ 500 (2 cores, no bf16)" if name == "float32+int8" else "—")]
        if name != "float32-padded":
            rows.append((f"extraction {name}: cosine to float32-padded features, mean / min (f(s, a); f(s))",
                         f"{cos['candidates_mean']:.4f} / {cos['candidates_min']:.4f}; "
                         f"{cos['states_mean']:.4f} / {cos['states_min']:.4f}", "mean ≥ 0.99"))
    return rows


def _retrieval_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    online, direct = r["online_feast_candidates"], r["direct_duckdb_parquet"]
    frame = r.get("training_frame_first") or {}
    return [
        ("Feast online read of one state's 64 candidate embeddings, p50 / p99 ms",
         f"{online['p50_ms']:.2f} / {online['p99_ms']:.2f}", "p99 ≤ 10"),
        ("same rows by DuckDB over the Parquet file, p50 / p99 ms", f"{direct['p50_ms']:.2f} / {direct['p99_ms']:.2f}", "—"),
        (f"point-in-time training set ({frame.get('rows', '?')} rows), s; equals the sources",
         f"{frame.get('wall_s', float('nan')):.2f}; {r.get('training_frame_equals_sources')}", "equal"),
    ]


def _critic_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(f"critic updates/s ratio {name} (best of runs)", f"{value:.3f}", "≥ 0.8" if name == "critic_td/bare_td" else "—")
            for name, value in r["ratios_best"].items()]


def _finetune_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(f"fine-tune {dtype} ({r['mode']}, batch {r['batch_size']}), train samples/s"
             + (f" ({row['achieved_gflops']:.0f} of {row['peak_gflops']:.0f} GFLOP/s matmul peak = "
                f"{row['fraction_of_peak']:.2f}, {row['gflops_per_sample']:.3f} GFLOP per sample)" if "fraction_of_peak" in row else ""),
             f"{row['train_samples_per_s']:.2f}", "—")
            for dtype, row in r["results"].items()]


def _import_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(f"import-digiq of {r['steps']} official-format steps, s (peak RSS {r['peak_rss_mib']:.0f} MiB)",
             f"{r['import_seconds']:.2f}", "—")]


BENCHES: dict[str, Bench] = {
    "import": Bench("import_bench.py", lambda out, quick: ["--steps", "200" if quick else "1000"], _import_rows,
                    stdout_json=True),
    "retrieval": Bench("retrieval_bench.py", lambda out, quick: ["--json", str(out)] + (
        ["--states", "300", "--reps", "200", "--file-reps", "20"] if quick else []), _retrieval_rows),
    "critic": Bench("critic_bench.py", lambda out, quick: [str(out)] + (["--updates", "100", "--repeats", "3"] if quick else []),
                    _critic_rows),
    "embed": Bench("embed_bench.py", lambda out, quick: [str(out), "--dataset", "data/raw", "--model", "models/finetuned",
                                                         "--dtypes", compute_dtypes()] + (["--states", "8", "--repeats", "1"] if quick else []),
                   _embed_rows, needs=("data/raw", "models/finetuned")),
    "finetune": Bench("finetune_bench.py", lambda out, quick: ["--json", str(out), "--dtypes", compute_dtypes()] + (["--steps", "2"] if quick else []),
                      _finetune_rows, needs=("data/raw", "data/labels.parquet", "models/base")),
    "collect": Bench("collect_bench.py", lambda out, quick: ["--tasks", "click-button,enter-text", "--episodes", "3"] if quick else [],
                     _collect_rows, stdout_json=True),
}


def last_json_object(text: str) -> dict[str, Any]:
    """The last top-level JSON object printed on ``text`` (a benchmark's result after its progress lines)."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i, ch in enumerate(text) if ch == "{" and (i == 0 or text[i - 1] == "\n")]):
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if not text[end:].strip() and isinstance(value, dict):
            return value
    raise DigiqError("the benchmark printed no JSON result", field="stdout")


def run_bench(name: str, root: Path, *, quick: bool, timeout_s: float) -> dict[str, Any]:
    bench = BENCHES[name]
    missing = [p for p in bench.needs if not (root / p).exists()]
    if missing:
        raise DigiqError(f"benchmark {name} needs {', '.join(missing)} (run `make repro` first)", file=root / missing[0])
    with tempfile.TemporaryDirectory(prefix=f"digiq-bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(root / "benchmarks" / bench.script), *bench.args(out, quick)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise DigiqError(f"benchmark {name} exited {proc.returncode}: {tail[0]}", file=root / "benchmarks" / bench.script)
        result = last_json_object(proc.stdout) if bench.stdout_json else json.loads(out.read_text())
    return {"command": " ".join(cmd[1:]), "wall_s": round(time.perf_counter() - started, 1), "result": result}


def stage_rows(profile: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, row in profile.get("stages", {}).items():
        wall = row["last_s"] - row["first_s"]
        rows.append((f"stage `digiq {name}`: wall time, peak memory (stage + children, PSS)",
                     f"{wall / 60:.1f} min, {row['peak_tree_mib'] / 1024:.2f} GiB", "≤ 4 GiB"))
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# digiq benchmarks\n\n{results['machine']['cpu_count']} CPUs ({results['machine']['processor']}), "
             f"load average at start {results['machine']['load_avg_start']}, quick={results['quick']}. "
             "Ratios are measured side by side in one run of each benchmark.\n",
             "| benchmark | what | measured | target |", "|---|---|---|---|"]
    for name, entry in results["benchmarks"].items():
        if "error" in entry:
            lines.append(f"| {name} | failed: {entry['error']} | — | — |")
            continue
        rows = stage_rows(entry["result"]) if name == "stages" else BENCHES[name].headline(entry["result"])
        lines += [f"| {name} | {what} | {measured} | {target} |" for what, measured, target in rows]
    return "\n".join(lines) + "\n"


def run_all(names: list[str], root: Path, out: Path, *, quick: bool = False, stage_profile: Path | None = None,
            timeout_s: float = 1800.0, on_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``names`` in order; write ``out`` (JSON) and ``out`` with .md (table). A failing benchmark is recorded,
    the others still run."""
    from digiq.atomic import write_json, write_text

    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        raise DigiqError(f"unknown benchmark(s) {unknown} (known: {', '.join(BENCHES)})", field="--only")
    results: dict[str, Any] = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "load_avg_start": [round(x, 2) for x in os.getloadavg()]},
        "quick": quick, "benchmarks": {},
    }
    for name in names:
        try:
            entry = run_bench(name, root, quick=quick, timeout_s=timeout_s)
        except (DigiqError, subprocess.TimeoutExpired) as exc:
            entry = {"error": str(exc).splitlines()[0]}
        results["benchmarks"][name] = entry
        if on_done is not None:
            on_done(name, entry)
    if stage_profile is not None and stage_profile.is_file():
        results["benchmarks"]["stages"] = {"command": f"benchmarks/stage_profile.py ({stage_profile})",
                                           "result": json.loads(stage_profile.read_text())}
    write_json(out, results)
    write_text(out.with_suffix(".md"), markdown(results))
    return results
