"""The offline dataset's regime (issue #32): how weak π_β is, how long its episodes last, and what the data show an
offline critic about actions other than π_β's mode. Read from the trajectories and the candidate table; no browser.

    regime = dataset_regime("data/raw", "data/candidates.parquet", "metrics/eval.json")   # {"suite": …, "tasks": …}
    check_regime(regime, RegimeParams(gate=True)).raise_for_failures("data/raw")        # the bands, as GX gates
    regime_markdown(regime)                                                              # the table, for docs

Notation. An episode τ succeeds when one of its steps has r > 0; |τ| is its stored steps. Step i has the dataset
action's semantic key a_i (candidate 0's :func:`~digiq.feature_contract.semantic_key`: taps by the DOM element under
the point) and K'_i = K − 1 fresh draws of π_β (candidates 1..K−1) with counts n_i(c) = #{k ≥ 1 : key_k = c}.
Figures, per task and pooled over the suite ("suite"):

    sample success      S  = #{τ : τ succeeds} / #{τ}           (the data are π_β's samples)
    horizon             H⁺ = mean |τ| over successful τ,   H = mean |τ| over all τ
    mode agreement      M  = #{i : a_i = m_i} / #{i : K'_i > 0},   m_i = argmax_c n_i(c)  (ties: the first drawn)
    mode success        behavior-mode's live success (argmax_k n_k, greedy protocol) from evaluate's metrics
                        (protocols.greedy.methods.behavior-mode); None, "not measured", without them

m_i is estimated from the fresh draws only, so a step's own dataset action never votes for itself.

State identity σ(i). Two steps are one state when they share the task, the goal, the DOM (every recorded field of
every element — ref, tag, id, classes, text, value, focus, bbox, … — compared as canonical JSON) and the history the
observation text shows. Identity "semantic" (default) compares that history by what it did: the semantic keys of the
trajectory's previous dataset actions, as many as the observation quotes, so two taps on the same button at different
jittered points are one history. Identity "exact" compares the observation text itself (what the VLM reads, tap
coordinates included). An observation not in the ``Previous Actions: … Goal: …`` form is compared as text.

    contrast            states σ whose steps hold ≥ 2 distinct dataset actions;  count, and fraction of distinct σ
    supported correction  a step i of a failed τ whose action is π_β's mode (a_i = m_i) and whose state was left, in a
                        successful episode, by another action: C_i = {a_j : σ(j) = σ(i), τ(j) succeeds} ∖ {a_i} ≠ ∅
    coverage            the fraction of those steps where π_β draws a correction (Σ_{c∈C_i} n_i(c) > 0), and the mean
                        draw share of the corrections Σ_{c∈C_i} n_i(c) / K'_i

Gates (Great Expectations, opt-in with ``regime.gate``): the suite's S within ``sample_success``, every task's
S ≥ ``min_task_success``, the suite's H⁺ ≥ ``min_success_horizon``, and, where measured, the suite's mode
success ≤ ``max_mode_success``. A failure names the task (or "suite") and the band.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from digiq.errors import DigiqError

if TYPE_CHECKING:
    import pandas as pd

    from digiq.checks import Expect, SuiteResult

Identity = Literal["semantic", "exact"]
SUITE = "suite"
MODE_METHOD = "behavior-mode"  # evaluate's greedy bar: argmax_k n_k over the live draws


class RegimeParams(BaseModel):
    """The regime's bands (issue #32), checked by ``digiq data regime`` when ``gate`` is on (a Section like config's,
    declared here so that config can embed it as ``regime`` without a cycle)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    gate: bool = Field(False, description="fail `digiq data regime` when the data leave the bands (off: today's default data are not in the regime)")
    sample_success: tuple[float, float] = Field((0.20, 0.35), description="band of π_β's episode success rate over the suite (the paper's AutoUI: 22.9 %)")
    min_task_success: float = Field(0.15, ge=0.0, le=1.0, description="every task's share of successful episodes at least this (filtered BC has something to learn from)")
    min_success_horizon: float = Field(5.0, ge=0.0, description="mean length of the suite's successful episodes at least this (steps)")
    max_mode_success: float = Field(0.45, ge=0.0, le=1.0, description="π_β's greedy mode success over the suite at most this, where evaluate measured it")
    identity: Identity = Field("semantic", description="state identity for contrast and corrections: semantic (history by what it did) | exact (observation text)")

    @model_validator(mode="after")
    def _band(self) -> RegimeParams:
        low, high = self.sample_success
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"sample_success must be a band 0 ≤ low ≤ high ≤ 1, got {list(self.sample_success)}")
        return self


# ----------------------------------------------------------------------------- the figures

def dataset_regime(raw: str | Path, candidates: str | Path, eval_metrics: str | Path | None = None,
                   identity: Identity = "semantic") -> dict[str, Any]:
    """The regime of a dataset: ``{"raw", "candidates", "eval", "identity", "suite": figures, "tasks": {task:
    figures}}`` (the figures of :func:`figures`; mode success from ``eval_metrics`` when it has behavior-mode)."""
    if identity not in ("semantic", "exact"):
        raise DigiqError(f"identity must be semantic or exact, got {identity!r}", field="regime.identity")
    steps = step_frame(raw, candidates, identity)
    mode = mode_success(eval_metrics)
    tasks = sorted(steps["task"].unique())
    return {
        "raw": str(raw), "candidates": str(candidates),
        "eval": str(eval_metrics) if mode is not None else None,
        "identity": identity,
        "suite": figures(steps, (mode or {}).get(SUITE)),
        "tasks": {task: figures(steps[steps["task"] == task], (mode or {}).get(task)) for task in tasks},
    }


def step_frame(raw: str | Path, candidates: str | Path, identity: Identity = "semantic") -> pd.DataFrame:
    """One row per dataset step: traj_id, step_id, task, success (of its episode), length (of its episode), key (a_i),
    draws (Counter n_i over the fresh draws, first-drawn order), mode (m_i, None without draws), state (σ(i))."""
    from digiq.store import Dataset

    table = Dataset(raw).table().select(["traj_id", "step_id", "task", "goal", "observation", "elements", "reward"])
    frame = table.to_pandas()
    if frame.empty:
        raise DigiqError("the dataset has no steps", file=raw)
    grouped = frame.groupby("traj_id")
    frame = frame.join(grouped["reward"].max().gt(0).rename("success"), on="traj_id")
    frame = frame.join(grouped.size().rename("length"), on="traj_id")
    keys = candidate_keys(candidates)
    missing = [(t, s) for t, s in zip(frame["traj_id"], frame["step_id"]) if (t, int(s)) not in keys]
    if missing:
        raise DigiqError(f"no candidates for state {missing[0][0]}/{missing[0][1]} ({len(missing)} of {len(frame)} "
                         "steps): was the candidate table made from this dataset?", file=candidates, field="traj_id")
    per_step = [keys[(t, int(s))] for t, s in zip(frame["traj_id"], frame["step_id"])]
    frame["key"] = [k[0] for k in per_step]
    frame["draws"] = [Counter(k[1:]) for k in per_step]
    frame["mode"] = [max(d, key=d.get) if d else None for d in frame["draws"]]  # first max = first drawn on ties
    frame["state"] = state_ids(frame, identity)
    return frame.drop(columns=["goal", "observation", "elements", "reward"])


def candidate_keys(path: str | Path) -> dict[tuple[str, int], list[str]]:
    """(traj_id, step_id) → the semantic keys of its candidates in cand_idx order (candidate 0: the dataset action)."""
    from digiq.parquet import read_table

    table = read_table(path, columns=["traj_id", "step_id", "cand_idx", "semantic_key"])
    table = table.sort_by([("traj_id", "ascending"), ("step_id", "ascending"), ("cand_idx", "ascending")])
    out: dict[tuple[str, int], list[str]] = {}
    for traj, step, index, key in zip(*(table.column(n).to_pylist() for n in table.column_names)):
        keys = out.setdefault((traj, int(step)), [])
        if index != len(keys):
            raise DigiqError(f"state {traj}/{step}: cand_idx {index} where {len(keys)} was expected (0, 1, … per state)",
                             file=path, field="cand_idx")
        keys.append(key)
    return out


def state_ids(frame: pd.DataFrame, identity: Identity) -> list[int]:
    """σ(i) per row of ``frame`` (rows in (traj_id, step_id) order with columns task, goal, observation, elements, key):
    equal integers for identical states."""
    from digiq.envs.view import previous_actions

    ids: dict[tuple[Any, ...], int] = {}
    out: list[int] = []
    history: list[str] = []  # the current trajectory's dataset action keys so far
    current = None
    for row in frame.itertuples(index=False):
        if row.traj_id != current:
            current, history = row.traj_id, []
        shown: Any = row.observation
        if identity == "semantic":
            try:
                n = len(previous_actions(row.observation, row.goal))
                shown = tuple(history[len(history) - n:]) if n else ()
            except DigiqError:
                pass  # not the observation form digiq writes: compared as text
        dom = json.dumps(json.loads(row.elements), sort_keys=True) if row.elements else ""
        out.append(ids.setdefault((row.task, row.goal, shown, dom), len(ids)))
        history.append(row.key)
    return out


def figures(steps: pd.DataFrame, mode: dict[str, Any] | None = None) -> dict[str, Any]:
    """The regime figures of some steps (one task's, or the suite's); ``mode``: behavior-mode's live summary."""
    episodes = steps.drop_duplicates("traj_id")
    won = episodes[episodes["success"]]
    drawn = steps[steps["mode"].notna()]
    contrast = steps.groupby("state")["key"].nunique()
    corrections = supported_corrections(steps)
    return {
        "episodes": int(len(episodes)),
        "successes": int(len(won)),
        "steps": int(len(steps)),
        "sample_success": float(len(won) / len(episodes)),
        "mean_success_horizon": float(won["length"].mean()) if len(won) else None,
        "mean_horizon": float(episodes["length"].mean()),
        "mode_agreement": float((drawn["key"] == drawn["mode"]).mean()) if len(drawn) else None,
        "mode_success": None if mode is None else float(mode["success"]),
        "mode_episodes": None if mode is None else int(mode["episodes"]),
        "states": int(len(contrast)),
        "contrast_states": int((contrast >= 2).sum()),
        "contrast_fraction": float((contrast >= 2).mean()),
        "supported_corrections": int(len(corrections)),
        "corrections_covered": int(sum(share > 0 for share in corrections)),
        "correction_coverage": float(sum(share > 0 for share in corrections) / len(corrections)) if corrections else None,
        "correction_share": float(sum(corrections) / len(corrections)) if corrections else None,
    }


def supported_corrections(steps: pd.DataFrame) -> list[float]:
    """The draw share Σ_{c∈C_i} n_i(c) / K'_i of each supported-correction step i (module docstring)."""
    fixes: dict[int, set[str]] = {}
    for state, key in zip(steps.loc[steps["success"], "state"], steps.loc[steps["success"], "key"]):
        fixes.setdefault(state, set()).add(key)
    shares = []
    failed = steps[~steps["success"] & (steps["key"] == steps["mode"])]
    for state, key, draws in zip(failed["state"], failed["key"], failed["draws"]):
        correcting = fixes.get(state, set()) - {key}
        if correcting:
            shares.append(sum(draws.get(c, 0) for c in correcting) / sum(draws.values()))
    return shares


def mode_success(path: str | Path | None) -> dict[str, dict[str, Any]] | None:
    """behavior-mode's greedy-protocol summaries from evaluate's metrics: {"suite": …, task: …} (success, episodes),
    or None when the file is absent or did not evaluate behavior-mode greedily."""
    if path is None or not Path(path).is_file():
        return None
    try:
        metrics = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DigiqError(f"invalid JSON ({exc})", file=path) from None
    method = (((metrics.get("protocols") or {}).get("greedy") or {}).get("methods") or {}).get(MODE_METHOD)
    if not isinstance(method, dict) or "success" not in method:
        return None
    return {SUITE: method, **{task: m for task, m in (method.get("per_task") or {}).items() if "success" in m}}


# ----------------------------------------------------------------------------- the gate

def regime_suite(regime: dict[str, Any], params: RegimeParams) -> tuple[pd.DataFrame, list[Expect]]:
    """The one-row frame of gated figures (one column per figure and task) and its expectations."""
    import pandas as pd

    low, high = params.sample_success
    suite = regime["suite"]
    row: dict[str, float] = {"suite:sample_success": suite["sample_success"],
                             "suite:mean_success_horizon": suite["mean_success_horizon"] or 0.0}
    expectations = [
        _between("suite:sample_success", low, high,
                 f"suite: π_β sample success in the band [{low:.0%}, {high:.0%}]"),
        _between("suite:mean_success_horizon", params.min_success_horizon, None,
                 f"suite: mean successful-episode length ≥ {params.min_success_horizon:g} steps"),
    ]
    for task, values in regime["tasks"].items():
        row[f"{task}:sample_success"] = values["sample_success"]
        expectations.append(_between(f"{task}:sample_success", params.min_task_success, None,
                                     f"{task}: successful episodes ≥ {params.min_task_success:.0%}"))
    if suite["mode_success"] is not None:
        row["suite:mode_success"] = suite["mode_success"]
        expectations.append(_between("suite:mode_success", None, params.max_mode_success,
                                     f"suite: π_β greedy mode success ≤ {params.max_mode_success:.0%}"))
    return pd.DataFrame([row]), expectations


def _between(column: str, low: float | None, high: float | None, description: str) -> Expect:
    from digiq.checks import Expect

    bounds = {name: float(v) for name, v in (("min_value", low), ("max_value", high)) if v is not None}
    return Expect("ExpectColumnMeanToBeBetween", {"column": column, **bounds}, description)


def check_regime(regime: dict[str, Any], params: RegimeParams, docs_dir: Path | None = None) -> SuiteResult:
    """The regime gate (Great Expectations) on :func:`dataset_regime`'s figures."""
    from digiq.checks import run_suite

    frame, expectations = regime_suite(regime, params)
    return run_suite("regime", frame, expectations, docs_dir=docs_dir)


# ----------------------------------------------------------------------------- rendering

COLUMNS = (  # (short header, header, figure key, format)
    ("eps", "episodes", "episodes", "n"), ("S", "sample success", "sample_success", "%"),
    ("mode=a", "mode agreement", "mode_agreement", "%"), ("mode live", "mode success (live)", "mode_success", "%"),
    ("H⁺", "mean length, successful", "mean_success_horizon", "f"), ("H", "mean length, all", "mean_horizon", "f"),
    ("states", "distinct states", "states", "n"), ("contr", "states with contrast", "contrast_states", "n"),
    ("contr%", "contrast fraction", "contrast_fraction", "%"),
    ("fixable", "mode-wrong, supported correction", "supported_corrections", "n"),
    ("drawn", "correction among draws", "correction_coverage", "%"), ("share", "correction draw share", "correction_share", "%"),
)
LEGEND = ("S: π_β sample success · mode=a: π_β's mode is the dataset action · mode live: behavior-mode's greedy success "
          "(evaluate) · H⁺ / H: mean episode length, successful / all · contr: states with ≥ 2 dataset actions · fixable: "
          "mode-wrong steps whose state a successful episode left another way · drawn / share: the correction among π_β's "
          "draws, and its draw share")


def cell(value: Any, kind: str, *, missing: str = "–", space: str = " ") -> str:
    """One figure as text: n (integer), % (one decimal), f (two decimals); None as ``missing``."""
    if value is None:
        return missing
    return {"n": lambda v: str(int(v)), "%": lambda v: f"{100 * v:.1f}{space}%", "f": lambda v: f"{v:.2f}"}[kind](value)


def rows(regime: dict[str, Any], *, unmeasured: str = "not measured", space: str = " ") -> list[tuple[str, list[str]]]:
    """(task or "suite", its cells in :data:`COLUMNS` order): the tasks, then the suite; unmeasured mode success
    reads ``unmeasured``."""
    named = [*regime["tasks"].items(), (SUITE, regime["suite"])]
    return [(name, [cell(values[key], kind, missing=unmeasured if key == "mode_success" else "–", space=space)
                     for _, _, key, kind in COLUMNS]) for name, values in named]


def regime_markdown(regime: dict[str, Any]) -> str:
    """The regime table as Markdown (for docs/results.md's pre-registration), with the identity used."""
    lines = ["| task | " + " | ".join(header for _, header, _, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows(regime)]
    return "\n".join(lines) + f"\n\nState identity: {regime['identity']}.\n"
