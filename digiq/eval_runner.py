"""The evaluation run: every method's live episodes in browser workers, kept as resumable shards, then summarised.

Runs: every method of each protocol's table (:meth:`EvaluateParams.methods_of`) plays
``episodes_per_task[protocol]`` episodes per task; all methods of one protocol play the same (task, seed) episodes,
so that they are compared in pairs (:func:`~digiq.evaluate.paired_section`). One pool of browser workers plays
them all: a unit is a (protocol, task, block of episodes) and each method of that protocol plays every episode of it
in turn in the same browser, so that pages that several methods reach by the same actions are played once
(``evaluate.reuse``, :mod:`digiq.envs.replay`), and so are the live features of a state
(:class:`~digiq.live_features.LiveFeaturizer`'s cache and one model per worker).

Resume: each (method, protocol, task, block of ``episodes_per_unit`` episodes) becomes one JSON shard under
``shards/<method>/<protocol>.<task>.…`` once all its episodes are in, written atomically; its name carries a
fingerprint of everything that changes an episode (protocol, seeds, K, noise, step cap, clock, the trained
policy's files, the feature recipe), so a re-run skips finished shards and never reuses stale ones.

Seeds: episode e of task t uses ``episode_seed(seed, t, e)`` as in collect; a run refuses to start when
any evaluation seed is one of collect's (collect.seed, collect.tasks, collect.episodes_per_task).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq.atomic import write_json
from digiq.envs.miniwob import BrowserConfig, check_tasks
from digiq.envs.policy import PolicySpec
from digiq.envs.replay import ReplayCounts
from digiq.envs.rollout import episode_seed
from digiq.envs.workers import RunConfig, Unit, episode_blocks, run_units
from digiq.errors import DigiqError
from digiq.evaluate import BASELINES, CRITIC_GREEDY, GREEDY_BAR, EvaluateParams, paired_section, summarise_method
from digiq.progress import progress_bar

if TYPE_CHECKING:
    from digiq.config import CollectParams, Params

FACTORY = "digiq.evaluate:build_eval_policy"
HANG_TIMEOUT_S = 300.0  # a worker silent this long is killed and its unit redone
# Bumped whenever the live candidate set changes for the same seed (shards made by another rule are not resumed).
CANDIDATE_RULE = "semantic_key/v2"  # duplicates by what they do; draws seeded by (episode seed, step) alone


@dataclass(frozen=True)
class Evaluation:
    """One evaluation run: ``settings`` is the ``evaluate`` section with collect's tasks, noise and step cap filled
    in where it leaves them null; ``collect`` gives π_β (behavior, history) and the seeds to avoid; ``features``
    is the live feature recipe (:func:`live_features`); ``k`` the candidates per live step, the candidates
    stage's ``candidates.k`` (so that n_β counts draws out of the same K offline and live); ``feature_cache``
    the folder where the workers share live features (:class:`~digiq.live_features.LiveFeaturizer`), or None."""

    settings: EvaluateParams
    collect: CollectParams
    features: dict[str, Any]
    k: int
    feature_cache: str | None = None

    @classmethod
    def of(cls, params: Params) -> Evaluation:
        ev, col = params.evaluate, params.collect
        resolved = ev.model_copy(update={"tasks": list(ev.tasks or col.tasks), "max_steps": ev.max_steps or col.max_steps,
                                         "noise": col.noise if ev.noise is None else ev.noise})
        return cls(resolved, col, live_features(params), params.candidates.k)

    @property
    def tasks(self) -> list[str]:
        return list(self.settings.tasks or [])

    def model_dir(self, method: str) -> Path:
        """The trained folder that ``method`` chooses with: the critic for critic-greedy, else its policy."""
        return Path(self.settings.critic) if method == CRITIC_GREEDY else Path(self.settings.actors) / method

    def runs(self) -> list[tuple[str, str]]:
        """(protocol, method) of every table row, protocol by protocol."""
        return [(protocol, method) for protocol in self.settings.protocols for method in self.settings.methods_of(protocol)]

    def units(self, protocol: str) -> list[Unit]:
        blocks = episode_blocks(self.settings.episodes_per_task[protocol], self.settings.episodes_per_unit)
        return [Unit(task, block) for task in self.tasks for block in blocks]

    def fingerprint(self, method: str, protocol: str) -> str:
        """Short hash of everything that changes the episodes of ``method`` under ``protocol``."""
        ev = self.settings
        parts: dict[str, Any] = {"seed": ev.seed, "k": self.k, "noise": ev.noise, "max_steps": ev.max_steps,
                                 "behavior": self.collect.behavior, "history": self.collect.history,
                                 "time_limit_s": ev.time_limit_s, "method": method, "protocol": protocol,
                                 "candidate_rule": CANDIDATE_RULE}
        if method not in BASELINES:
            parts["actor"] = file_digest(self.model_dir(method))
            parts["features"] = {k: v for k, v in self.features.items() if k != "channels"}
            parts["model"] = self.model_hash
            if reads_channels(self.model_dir(method)):
                parts["channels"] = self.channel_hash
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]

    @functools.cached_property
    def model_hash(self) -> str:
        """The feature model's hash (hundreds of MB: hashed once per run, not per method)."""
        from digiq.extractor import model_hash

        return model_hash(self.features["model"])

    @functools.cached_property
    def channel_hash(self) -> str | None:
        """The channel models' hash, once per run and only when some chooser reads channels."""
        from digiq.live_features import channel_hash

        return channel_hash(self.features.get("channels") or {})

    @property
    def scratch(self) -> Path:
        """The run's shared live-feature cache (removed once eval.json is written)."""
        return Path(self.settings.shards) / ".features"

    def shard_path(self, method: str, protocol: str, unit: Unit, fp: str) -> Path:
        first, last = unit.indices[0], unit.indices[-1]
        return Path(self.settings.shards) / method / f"{protocol}.{unit.task}.e{first:05d}-{last:05d}.{fp}.json"

    def policy_spec(self, method: str, protocol: str) -> PolicySpec:
        ev = self.settings
        kwargs: dict[str, Any] = {"method": method, "k": self.k, "noise": ev.noise, "protocol": protocol,
                                  "behavior": dict(self.collect.behavior)}
        if method not in BASELINES:
            kwargs.update(actor_dir=str(self.model_dir(method)), features=dict(self.features), threads=1,
                          feature_cache=self.feature_cache)
        return PolicySpec(FACTORY, kwargs)

    def run_config(self, runs: list[tuple[str, str]], browser: BrowserConfig) -> RunConfig:
        """One worker configuration for every (protocol, method) in ``runs``: units name them by :func:`run_name`."""
        shared = self.settings.shared_model and any(m not in BASELINES for _, m in runs)  # one model per node (Ray)
        server = {"features": dict(self.features), "cache": self.feature_cache} if shared else None
        policies = tuple((run_name(run), self.policy_spec(run[1], run[0])) for run in runs)
        return RunConfig(policy=policies[0][1], policies=policies, reuse=self.settings.reuse, seed=self.settings.seed,
                         max_steps=self.settings.max_steps, history=self.collect.history, browser=browser,
                         hang_timeout_s=HANG_TIMEOUT_S, feature_server=server)


def run_name(run: tuple[str, str]) -> str:
    """How a unit names the (protocol, method) of a run: ``protocol/method``."""
    return "/".join(run)


def live_features(params: Params) -> dict[str, Any]:
    """The embed stage's recipe for the variant the policies were trained on (``features.variant``) and the channels
    stage's models: the :class:`~digiq.live_features.LiveFeaturizer` arguments, so that live features equal training
    features."""
    variant, embed = params.features.variant, params.embed
    if variant not in embed.models:
        raise DigiqError(f"no model path for variant {variant!r} in embed.models", field="features.variant")
    channels = params.channels.model_dump(include={"model", "encoder", "dtype", "batch_size"})
    return {"variant": variant, "model": embed.models[variant], "layer": embed.layer, "pooling": embed.pooling,
            "dtype": embed.dtype, "quantize": embed.quantize, "device": embed.device, "channels": channels}


# ----------------------------------------------------------------------------------------------- checks


def check(evaluation: Evaluation) -> None:
    """Refuse a run that cannot start: no or unknown tasks, a missing trained folder, seeds shared with collect."""
    if not evaluation.tasks:
        raise DigiqError("no tasks given", field="evaluate.tasks")
    check_tasks(evaluation.tasks, "evaluate.tasks")
    for method in evaluation.settings.methods:
        if method not in BASELINES and not evaluation.model_dir(method).is_dir():
            stage = "critic" if method == CRITIC_GREEDY else "actor"
            raise DigiqError(f"no trained {stage} for method {method!r} (run the {stage} stage, or drop it from evaluate.methods)",
                             file=evaluation.model_dir(method), field="evaluate.methods")
    ev = evaluation.settings
    homeless = [m for m in ev.methods if not any(m in ev.methods_of(protocol) for protocol in ev.protocols)]
    if homeless:
        raise DigiqError(f"method(s) {homeless} belong to no protocol of {ev.protocols} (behavior and random: sample; "
                         f"behavior-mode and critic-greedy: greedy)", field="evaluate.methods")
    check_disjoint_seeds(evaluation)


def collect_seeds(seed: int, tasks: list[str], episodes: int) -> set[int]:
    return {episode_seed(seed, t, e) for t in tasks for e in range(episodes)}


def check_disjoint_seeds(evaluation: Evaluation) -> None:
    """Refuse evaluation episodes whose environment seed was used to collect the training data."""
    ev, col = evaluation.settings, evaluation.collect
    used = collect_seeds(col.seed, col.tasks, col.episodes_per_task)
    shared = used & collect_seeds(ev.seed, evaluation.tasks, max(ev.episodes_per_task.values()))
    if ev.seed == col.seed or shared:
        raise DigiqError(f"evaluation seed {ev.seed} reuses {len(shared) or 'all'} episode seeds of collection "
                         f"(collect.seed {col.seed}); pick another evaluate.seed", field="evaluate.seed")


# ----------------------------------------------------------------------------------------------- shards


def reads_channels(folder: Path) -> bool:
    """Whether the chooser saved in ``folder`` reads channels beyond the VLM feature (its config.json's inputs)."""
    from digiq.live_features import vlm_only

    try:
        config = json.loads((folder / "config.json").read_text()).get("config", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return False  # check() has refused a missing folder; an unreadable one fails where the chooser loads
    return not vlm_only(config.get("inputs"))


def file_digest(folder: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``folder`` (sorted)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def read_shard(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DigiqError(f"unreadable result shard ({exc}); delete it to re-run its episodes", file=path) from None


class ShardWriter:
    """Collects the episode summaries of one (protocol, method) from the workers and writes a unit's shard once all
    of its episodes are in."""

    def __init__(self, evaluation: Evaluation, run: tuple[str, str], units: list[Unit], fp: str, advance: Callable[[], None]):
        self.evaluation, (self.protocol, self.method), self.fp, self.advance = evaluation, run, fp, advance
        self.unit_of = {(u.task, i): u for u in units for i in u.indices}
        self.got: dict[Unit, dict[int, dict[str, Any]]] = {u: {} for u in units}

    def received(self) -> list[dict[str, Any]]:
        """Every episode summary this run handed in (with its cost)."""
        return [summary for got in self.got.values() for summary in got.values()]

    def __call__(self, summary: dict[str, Any]) -> None:
        unit = self.unit_of[(summary["task"], summary["index"])]
        fresh = summary["index"] not in self.got[unit]
        self.got[unit][summary["index"]] = summary
        if fresh:
            self.advance()
        if len(self.got[unit]) == len(unit.indices):
            done = [self.got[unit][i] for i in unit.indices]
            episodes = [{k: v for k, v in e.items() if k not in ("run", "cost")} for e in done]
            write_json(self.evaluation.shard_path(self.method, self.protocol, unit, self.fp),
                       {"method": self.method, "protocol": self.protocol, "task": unit.task, "fingerprint": self.fp,
                        "episodes": episodes, "costs": [e["cost"] for e in done]})  # what it took: not a result


def load_episodes(evaluation: Evaluation, run: tuple[str, str], fp: str) -> list[dict[str, Any]]:
    protocol, method = run
    episodes: list[dict[str, Any]] = []
    for unit in evaluation.units(protocol):
        path = evaluation.shard_path(method, protocol, unit, fp)
        if not path.exists():
            raise DigiqError("result shard missing after the run", file=path)
        episodes.extend(read_shard(path)["episodes"])
    return episodes


# ----------------------------------------------------------------------------------------------- run

Fingerprints = dict[tuple[str, str], str]  # (protocol, method) -> fingerprint


def fingerprints(evaluation: Evaluation) -> Fingerprints:
    return {(protocol, method): evaluation.fingerprint(method, protocol) for protocol, method in evaluation.runs()}


def run_methods(evaluation: Evaluation, prints: Fingerprints, *, progress: bool = False) -> dict[str, Any]:
    """Run the episodes of every (protocol, method) that have no finished shard, all in one pool of browsers: a
    unit is one (protocol, task, block of episodes) and every method of that protocol still to run it plays each of
    its episodes in turn, so that what their episodes share is played once (``evaluate.reuse``). Return this run's
    timing: per protocol and method, and for the whole pool."""
    ev = evaluation.settings
    browser = BrowserConfig(time_limit_s=ev.time_limit_s)
    browser.check()
    todo = {run: [u for u in evaluation.units(run[0]) if not evaluation.shard_path(run[1], run[0], u, fp).exists()]
            for run, fp in prints.items()}
    units = pooled_units(evaluation, todo)
    runs = [run for run in prints if todo[run]]
    total = sum(len(evaluation.tasks) * ev.episodes_per_task[protocol] for protocol, _ in prints)
    with progress_bar("evaluate", total, enabled=progress, unit="episodes") as bar:
        bar.update(completed=total - sum(len(u.indices) for us in todo.values() for u in us))
        writers = {run_name(run): ShardWriter(evaluation, run, todo[run], prints[run], bar.advance) for run in runs}
        started = time.perf_counter()
        if units:
            run_units(units, evaluation.run_config(runs, browser), ev.workers,
                      on_episode=lambda summary: writers[summary["run"]](summary), executor=ev.executor)
        seconds = time.perf_counter() - started
    timing: dict[str, Any] = {}
    for protocol, method in runs:
        timing.setdefault(protocol, {})[method] = method_timing(writers[run_name((protocol, method))].received())
    played = [summary for writer in writers.values() for summary in writer.received()]
    return {"methods": timing, "pool": pool_timing(played, seconds, ev)}


def pooled_units(evaluation: Evaluation, todo: dict[tuple[str, str], list[Unit]]) -> list[Unit]:
    """One unit per (protocol, task, block) that some method still has to play, naming those methods (in the order of
    the protocol's table); tasks in order, so that a worker keeps its browser on one task."""
    pooled = []
    for protocol in evaluation.settings.protocols:
        for unit in evaluation.units(protocol):
            runs = tuple(run_name(run) for run, units in todo.items() if run[0] == protocol and unit in units)
            if runs:
                pooled.append(Unit(unit.task, unit.indices, runs=runs))
    return sorted(pooled, key=lambda u: (u.task, u.indices[0]))


def method_timing(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """A method's episodes of this run: the seconds its episodes took in the workers (policy and browser; a page
    another method had already played costs no browser time), per episode and in all."""
    seconds, steps = sum(e["cost"]["seconds"] for e in episodes), sum(e["steps"] for e in episodes)
    return {"seconds": round(seconds, 2), "episodes": len(episodes), "steps": steps,
            "seconds_per_episode": round(seconds / max(len(episodes), 1), 3),
            "steps_per_second": round(steps / seconds, 2) if seconds > 0 else 0.0, "pages": pages_of(episodes)}


def pages_of(episodes: list[dict[str, Any]]) -> dict[str, int]:
    """Where the pages of ``episodes`` came from: summed :class:`~digiq.envs.replay.ReplayCounts` of their costs."""
    return {k: sum(e["cost"][k] for e in episodes) for k in ReplayCounts().as_dict()}


def pool_timing(episodes: list[dict[str, Any]], seconds: float, ev: EvaluateParams) -> dict[str, Any]:
    """The whole pool: wall seconds, episodes, and where the pages of all episodes came from."""
    pages = pages_of(episodes)
    return {"wall_seconds": round(seconds, 1), "episodes": len(episodes), "workers": ev.workers, "reuse": ev.reuse,
            "pages": pages, "pages_from_browser": round((pages["browser"] + pages["replayed"]) / max(sum(pages.values()), 1), 3)}


# ----------------------------------------------------------------------------------------------- results


def summarise(evaluation: Evaluation, prints: Fingerprints, timing: dict[str, Any]) -> dict[str, Any]:
    """The metrics of eval.json: per protocol, every method's pooled and per-task success summaries and the paired
    comparisons of ``evaluate.reference`` with each other method (McNemar), from the finished shards."""
    ev = evaluation.settings
    protocols: dict[str, Any] = {}
    for protocol in ev.protocols:
        episodes = {method: load_episodes(evaluation, (protocol, method), prints[(protocol, method)])
                    for method in ev.methods_of(protocol)}
        protocols[protocol] = {
            "episodes_per_task": ev.episodes_per_task[protocol],
            **({"bar": GREEDY_BAR} if protocol == "greedy" else {}),
            "methods": {m: summarise_method(eps, evaluation.tasks) for m, eps in episodes.items()},
            "paired": {"reference": ev.reference, "test": "exact McNemar, two-sided; pairs by (task, seed)",
                       "against": paired_section(episodes, ev.reference, evaluation.tasks)},
        }
    return {
        "protocols": protocols,
        "tasks": evaluation.tasks,
        "seed": ev.seed,
        "k": evaluation.k,
        "noise": ev.noise,
        "behavior": dict(evaluation.collect.behavior),
        "max_steps": ev.max_steps,
        "time_limit_s": ev.time_limit_s,
        "timing": {"this_run": timing["methods"], "pool": timing["pool"],  # how it ran, not what
                   "seconds_per_episode_vs_random": against_random(timing["methods"]),
                   "executor": {"name": ev.executor, "workers": ev.workers, "shared_model": ev.shared_model}},
    }


def against_random(methods: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each method's worker seconds per episode over random's, in a protocol of this run where random played."""
    return {m: round(t["seconds_per_episode"] / table["random"]["seconds_per_episode"], 3)
            for table in methods.values() if table.get("random", {}).get("seconds_per_episode")
            for m, t in table.items() if m != "random"}


def plot_rows(metrics: dict[str, Any]) -> str:
    """plots/eval.csv: one row per (protocol, method, task) and per (protocol, method) over all tasks."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["protocol", "method", "task", "success", "ci_low", "ci_high", "episodes"])
    for protocol, table in metrics["protocols"].items():
        for method, m in table["methods"].items():
            for task, t in [*m["per_task"].items(), ("all", m)]:
                out.writerow([protocol, method, task, round(t["success"], 4), t["ci95"][0], t["ci95"][1], t["episodes"]])
    return buf.getvalue()
