"""DVC stage `critic`: train the double Q/V critic on the frozen features served by Feast.

    Feast (features/, variant) ─▶ training_frame ─▶ Transitions ─┬─ train rows ─▶ train_critic ─▶ models/critic/
                                                                 └─ val rows (held-out trajectories) ─▶ val losses, diagnostics
    outputs: models/critic/{model.safetensors, config.json, step_scores.parquet, candidate_scores.parquet}
             metrics/critic.json, dvclive/critic/ (Q/V loss, TD error, mean Q per logged update)
    models/critic.ckpt: training checkpoint (weights, target nets, optimizers, sampler, RNG, history) every
             ``critic.checkpoint_every`` updates; a killed run resumes from it; removed once the outputs are written

Decisions (documented here because the stage, not the library, makes them):

- **Truncated episodes.** The last stored step of an episode cut off by the step cap has no s'
  (``has_next`` False) but is not terminal (``done`` False). Its TD target r + γ·V̄(s') has no s' to
  bootstrap from, and treating it as terminal would teach V(s) ≈ 0 for states that are merely cut
  off. Such rows are **dropped from training and validation** (both targets, so TD and MC see the same
  rows) and counted in the metrics (``rows.truncated``). They are still scored (V, Q, candidates);
  ``step_scores.parquet`` has no row for them because a TD error is undefined (the viewer shows "—").
- **Validation** holds out whole trajectories (``val_fraction`` of them, a seeded permutation of the
  sorted trajectory ids), so no state of a held-out episode leaks into training through s'.
- **Candidates** that do what an earlier candidate does (same :func:`digiq.candidates.semantic_key`) are
  masked out (``Transitions.cand_mask`` marks valid *and distinct* candidates): a duplicate must not count
  twice in ranking or Best-of-N. How many draws each kept candidate stands for is ``cand_count`` (the
  actor's behavior prior).
- **Trajectory success** = some step of the trajectory has reward > 0 (``Trajectory.success``), from
  the rewards served by the feature store.
- **Reported scores** use the critic's policy-extraction convention: V = max(V1, V2), Q = max(Q1, Q2),
  advantage = Q − V; ``td_error`` = (the stage's Q target) − Q, i.e. r + γ(1−done)·min V̄(s') − Q for
  ``td`` and G(s) − Q for ``mc``.

Everything is written atomically; a fixed seed gives identical weights, scores and metrics (except
``timings_s``), also when a killed run is re-run and resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digiq.atomic import atomic_path, write_json
from digiq.errors import DigiqError

if TYPE_CHECKING:
    import torch

    from digiq.config import Params
    from digiq.critic import CriticConfig, DoubleCritic, Transitions
    from digiq.pipelines.features import TrainingFrame

DEFAULT_VAL_FRACTION = 0.1
STEP_SCORES = "step_scores.parquet"
CANDIDATE_SCORES = "candidate_scores.parquet"
CURVES = ("q_loss", "v_loss", "td_error", "q_mean", "v_mean", "q_target_mean", "cql_gap", "val_q_loss", "val_v_loss")


# ----------------------------------------------------------------------------- configs from params

def critic_config(params: Params, target: str | None = None) -> CriticConfig:
    """CriticConfig from params.critic (+ the global gamma and seed); ``target`` overrides critic.target."""
    from digiq.critic import CriticConfig

    fields = params.critic.model_dump(exclude={"out", "val_fraction", "checkpoint_every"})
    if target is not None:
        fields["target"] = target
    return CriticConfig(gamma=params.gamma, seed=params.seed, **fields)


def val_fraction(params: Params) -> float:
    """params.critic.val_fraction when the config carries it, else DEFAULT_VAL_FRACTION."""
    return float(getattr(params.critic, "val_fraction", DEFAULT_VAL_FRACTION))


def training_threads() -> int:
    """torch intra-op threads for critic training: ``$DIGIQ_THREADS``, else 1.

    The heads are small MLPs (batch 128, width 256): measured here on the shared 2-core machine, one
    update took 10–70 ms with 1 thread and 90–1200 ms with 2 (spin-waiting threads under contention).
    """
    from digiq.runtime import set_threads

    return set_threads(int(os.environ.get("DIGIQ_THREADS", "1")))


# ----------------------------------------------------------------------------- stage data

@dataclass
class StageData:
    """The feature-store frame plus the per-row facts both critic and actor stages need."""

    frame: TrainingFrame
    traj_id: np.ndarray    # [N] str
    step_id: np.ndarray    # [N] int64
    success: np.ndarray    # [N] bool: the row's trajectory has a step with reward > 0
    truncated: np.ndarray  # [N] bool: no s' and not done (cut-off last step)
    distinct: np.ndarray   # [N, K] bool: valid candidates whose semantic key is not a repeat
    draws: np.ndarray      # [N, K] float: at a distinct candidate, the valid candidates sharing its key (else 0)
    source: str

    def __len__(self) -> int:
        return len(self.traj_id)

    def transitions(self, rows: np.ndarray | None = None) -> Transitions:
        """The rows (all when None) as the library's Transitions (zero-copy views where possible)."""
        import torch

        from digiq.critic import Transitions

        f = self.frame
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])

        def tensor(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.from_numpy(np.require(pick(a), requirements=["C", "W"])).to(dtype)  # Arrow-backed arrays are read-only

        return Transitions(
            s=tensor(f.state), sa=tensor(f.action), s_next=tensor(f.next_state), reward=tensor(f.reward),
            done=tensor(f.done), mc_return=tensor(f.mc_return), cand_sa=tensor(f.candidates),
            cand_mask=tensor(self.distinct, torch.bool), cand_count=tensor(self.draws),
            traj_success=tensor(self.success, torch.bool), source=self.source,
        )


def load_stage_data(repo: str | Path, variant: str) -> StageData:
    """Read the whole training frame of ``variant`` from the Feast store at ``repo`` (DigiqError if not materialized).

    Candidates are de-duplicated by what they do (:func:`digiq.candidates.semantic_key`: taps by the element under
    the point, from the steps of the dataset the store was built from), as online evaluation does."""
    from digiq.pipelines.features import open_store, store_dataset, training_frame

    store = open_store(repo, variant)  # names registry.db and `digiq features materialize --variant …` when absent
    frame = training_frame(store)
    source = f"feature store {Path(repo) / 'data' / variant} (variant {variant})"
    if len(frame) == 0:
        raise DigiqError(f"the feature store serves no transitions (run `digiq features materialize --variant {variant}`)",
                         file=Path(repo) / "data" / variant, field="transition")
    traj_id, step_id = split_keys(frame.state_key)
    keys = semantic_keys(frame.candidate_actions, frame.candidate_mask, traj_id, step_id, store_dataset(repo, variant))
    distinct, draws = candidate_classes(keys, frame.candidate_mask)
    return StageData(
        frame=frame, traj_id=traj_id, step_id=step_id, success=trajectory_success(traj_id, frame.reward),
        truncated=~frame.has_next & ~frame.done, distinct=distinct, draws=draws, source=source,
    )


def split_keys(state_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """"traj/step" keys → (traj_id [N] str, step_id [N] int64); the traj id may itself contain '/'."""
    parts = [str(key).rsplit("/", 1) for key in state_keys]
    return np.array([p[0] for p in parts], dtype=object), np.array([int(p[1]) for p in parts], dtype=np.int64)


def trajectory_success(traj_id: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """Per row: whether any row of the same trajectory has reward > 0."""
    codes, inverse = np.unique(traj_id, return_inverse=True)
    success = np.zeros(len(codes), dtype=bool)
    np.logical_or.at(success, inverse, reward > 0)
    return success[inverse]


def semantic_keys(actions: np.ndarray, mask: np.ndarray, traj_id: np.ndarray, step_id: np.ndarray,
                  dataset: str | Path) -> np.ndarray:
    """[N, K] :func:`digiq.candidates.semantic_key` of every valid candidate (elements from the dataset's steps)."""
    import json

    from digiq.candidates import semantic_key
    from digiq.store import Dataset

    table = Dataset(dataset).table().select(["traj_id", "step_id", "elements"]).to_pylist()
    elements = {(r["traj_id"], int(r["step_id"])): json.loads(r["elements"]) if r["elements"] else [] for r in table}
    out = np.full(actions.shape, None, dtype=object)
    for i, k in zip(*np.nonzero(mask)):
        out[i, k] = semantic_key(actions[i, k], elements.get((traj_id[i], int(step_id[i]))))
    return out


def candidate_classes(keys: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group each state's valid candidates by key: (distinct [N, K] bool, draws [N, K] float).

    ``distinct`` keeps the first candidate of each key; ``draws`` holds, at that candidate, how many valid
    candidates share its key (0 elsewhere)."""
    from digiq.candidates import key_classes

    distinct = np.zeros_like(mask)
    draws = np.zeros(mask.shape, dtype=np.float32)
    for i in range(len(mask)):
        valid = np.flatnonzero(mask[i])
        for first, count in key_classes(keys[i, valid]).values():
            distinct[i, valid[first]] = True
            draws[i, valid[first]] = count
    return distinct, draws


def split_trajectories(traj_id: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """[N] bool, True for rows of held-out trajectories: round(fraction · n_traj) of them (≥ 1 when fraction > 0
    and there are ≥ 2 trajectories; never all), chosen by a seeded permutation of the sorted ids."""
    if not 0.0 <= fraction < 1.0:
        raise DigiqError(f"must be in [0, 1), got {fraction}", field="critic.val_fraction")
    unique = np.unique(traj_id)
    n_val = min(max(round(fraction * len(unique)), 1 if fraction > 0 else 0), len(unique) - 1)
    held_out = unique[np.random.default_rng(seed).permutation(len(unique))[:n_val]]
    return np.isin(traj_id, held_out)


# ----------------------------------------------------------------------------- DVCLive curves

@contextlib.contextmanager
def live_curves(directory: str | Path | None, curves: tuple[str, ...] = CURVES) -> Iterator[Any]:
    """A ``log_fn(point, step)`` writing DVCLive step metrics into ``directory`` (atomically replaced at the end).

    ``train/<name>`` for training-window means, ``val/<name>`` for held-out losses; the x axis is the update count.
    None: a no-op logger.
    """
    if directory is None:
        yield None
        return
    from dvclive import Live

    with atomic_path(directory) as tmp:
        live = Live(str(tmp), save_dvc_exp=False, dvcyaml=False, report=None)

        def log(point: dict[str, float], step: int) -> None:
            live.step = step
            for name in curves:
                if name in point and math.isfinite(point[name]):
                    group = "val" if name.startswith("val_") else "train"
                    live.log_metric(f"{group}/{name.removeprefix('val_')}", point[name])

        yield log
        live.end()


# ----------------------------------------------------------------------------- scores (the viewer's contract)

def _device(module: Any) -> Any:
    return next(module.parameters()).device


def q_targets(critic: DoubleCritic, data: Transitions) -> torch.Tensor:
    """The Q target the critic was trained on, per row: r + γ(1 − done)·min V̄(s') (td) or G(s) (mc)."""
    from digiq.critic import Batch, td_q_target
    from digiq.nn import map_chunks

    config = critic.config
    if config.target == "mc":
        return data.mc_return.float().cpu()
    return map_chunks(lambda *cols: td_q_target(critic.target, Batch(*cols), config.gamma),
                      data.s, data.sa, data.s_next, data.reward, data.done, data.mc_return, device=_device(critic))


def step_scores(critic: DoubleCritic, stage: StageData, rows: np.ndarray, split: np.ndarray) -> Any:
    """pyarrow table: traj_id, step_id, v, q, advantage, td_error (+ split) for ``rows``."""
    import pyarrow as pa

    from digiq.nn import map_chunks

    data = stage.transitions(rows)
    v = map_chunks(critic.v_value, data.s, device=_device(critic))
    q = map_chunks(critic.q_value, data.sa, device=_device(critic))
    return pa.table({
        "traj_id": pa.array(stage.traj_id[rows].tolist(), pa.string()), "step_id": pa.array(stage.step_id[rows], pa.int64()),
        "v": v.double().numpy(), "q": q.double().numpy(), "advantage": (q - v).double().numpy(),
        "td_error": (q_targets(critic, data) - q).double().numpy(), "split": pa.array(split[rows].tolist(), pa.string()),
    })


def candidate_scores(critic: DoubleCritic, stage: StageData) -> Any:
    """pyarrow table: traj_id, step_id, cand_idx, action, q for every candidate the store serves."""
    import pyarrow as pa
    import torch

    from digiq.nn import map_chunks

    f = stage.frame
    q = map_chunks(critic.q_value, torch.from_numpy(f.candidates), device=_device(critic)).double().numpy()
    row, idx = np.nonzero(f.candidate_mask)
    return pa.table({
        "traj_id": pa.array(stage.traj_id[row].tolist(), pa.string()), "step_id": pa.array(stage.step_id[row], pa.int64()),
        "cand_idx": pa.array(idx, pa.int64()), "action": pa.array(f.candidate_actions[row, idx].tolist(), pa.string()),
        "q": q[row, idx],
    })


def write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


# ----------------------------------------------------------------------------- the stage

@dataclass
class CriticOutcome:
    metrics: dict[str, Any]
    out: Path
    history: list[dict[str, float]]


def run(
    config: CriticConfig,
    *,
    repo: str | Path,
    variant: str,
    out: str | Path,
    metrics_path: str | Path | None = "metrics/critic.json",
    live_dir: str | Path | None = "dvclive/critic",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    progress: bool = False,
    checkpoint_every: int | None = None,
) -> CriticOutcome:
    """Train the critic on the store's transitions and write weights, scores, metrics and curves.

    With ``checkpoint_every``, training state is checkpointed to :func:`checkpoint_path` (``<out>.ckpt``) and a
    killed run resumes from it; the checkpoint is removed once the outputs are written."""
    import torch

    from digiq.critic import critic_diagnostics, train_critic

    started = time.perf_counter()
    out = Path(out)
    threads = training_threads()
    stage = load_stage_data(repo, variant)
    loaded = time.perf_counter()
    is_val = split_trajectories(stage.traj_id, val_fraction, config.seed)
    train_rows = np.flatnonzero(~is_val & ~stage.truncated)
    val_rows = np.flatnonzero(is_val & ~stage.truncated)
    if len(train_rows) == 0:
        raise DigiqError("no training transitions left after holding out validation trajectories and truncated steps",
                         file=stage.source, field="critic.val_fraction")
    train_data = stage.transitions(train_rows)
    val_data = stage.transitions(val_rows) if len(val_rows) else None
    with live_curves(live_dir) as log_fn:
        train_start = time.perf_counter()  # training time excludes DVCLive's start-up
        critic, history = train_critic(train_data, config, log_fn, val_data=val_data, show_progress=progress,
                                       checkpoint=checkpoint_path(out) if checkpoint_every else None,
                                       checkpoint_every=checkpoint_every or config.updates)
        trained = time.perf_counter()
    with torch.no_grad():
        diagnostics = {"train": critic_diagnostics(critic, train_data)}
        if val_data is not None:
            diagnostics["val"] = critic_diagnostics(critic, val_data)
    split = np.where(stage.truncated, "truncated", np.where(is_val, "val", "train"))
    with atomic_path(out) as tmp:
        critic.save_pretrained(tmp)
        write_parquet(step_scores(critic, stage, np.flatnonzero(~stage.truncated), split), tmp / STEP_SCORES)
        write_parquet(candidate_scores(critic, stage), tmp / CANDIDATE_SCORES)
    timings = {"load": loaded - started, "train": trained - train_start, "total": time.perf_counter() - started,
               "updates_per_s": config.updates / max(trained - train_start, 1e-9), **{f"frame_{k.removesuffix('_s')}": v for k, v in stage.frame.timings.items()}}
    metrics = critic_metrics(config, variant, stage, is_val, history, diagnostics, timings | {"threads": threads})
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    checkpoint_path(out).unlink(missing_ok=True)
    return CriticOutcome(metrics=metrics, out=out, history=history)


def checkpoint_path(out: str | Path) -> Path:
    """The training checkpoint of the critic written to ``out``: a sibling file ``<out>.ckpt``."""
    out = Path(out)
    return out.with_name(f"{out.name}.ckpt")


def critic_metrics(config: CriticConfig, variant: str, stage: StageData, is_val: np.ndarray,
                   history: list[dict[str, float]], diagnostics: dict[str, dict[str, float]],
                   timings: dict[str, float]) -> dict[str, Any]:
    """metrics/critic.json: headline diagnostics (held-out when there is a validation split), losses, counts."""
    last = history[-1]
    headline = diagnostics.get("val", diagnostics["train"])
    metrics = {
        "variant": variant,
        "target": config.target,
        "updates": config.updates,
        "rows": {"total": len(stage), "train": int((~is_val & ~stage.truncated).sum()), "val": int((is_val & ~stage.truncated).sum()),
                 "truncated": int(stage.truncated.sum()), "terminal": int(stage.frame.done.sum())},
        "trajectories": {"total": len(np.unique(stage.traj_id)), "val": len(np.unique(stage.traj_id[is_val])),
                         "success_rate_of_rows": float(stage.success.mean())},
        "candidates": {"k_max": int(stage.frame.candidate_mask.shape[1]), "distinct_per_state": float(stage.distinct.sum(1).mean())},
        "action_sensitivity": headline.get("action_sensitivity"),
        "ranking_quality": headline.get("ranking_quality"),
        "v_return_corr": headline.get("v_return_corr"),
        "diagnostics_on": "val" if "val" in diagnostics else "train",
        "train": {name: last[name] for name in ("q_loss", "v_loss", "td_error", "q_mean", "v_mean", "cql_gap") if name in last},
        "val": {name.removeprefix("val_"): last[name] for name in ("val_q_loss", "val_v_loss") if name in last},
        "diagnostics": diagnostics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return finite_or_none(metrics)


def finite_or_none(value: Any) -> Any:
    """NaN/inf → None (JSON has no NaN; DVC metrics readers reject it), recursively."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
