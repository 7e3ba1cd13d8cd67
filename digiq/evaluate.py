"""Online evaluation: a policy picks among π_β's candidates, live, in MiniWoB++, under two protocols.

Each live step t of an episode with seed σ is built the same way for every method, so methods differ only in the
choice:

    1. π_β proposes K candidates:  a_1 … a_K ~ π_β(· | s), drawn from a generator seeded by (σ, t) alone
       (:func:`step_rng`, stream "candidates"), so every method in the same state at the same step sees the same
       candidates; duplicates by what they do dropped (taps: the element under the point), first-draw order kept;
       n_k = how many of the K draws the kept a_k stands for.
    2. a chooser picks one, with its own uniform u_t ~ U[0, 1) from the generator of (σ, t), stream "choice"
       (the same u_t for every method: sampled choices are coupled, which sharpens the paired tests):
         sample protocol (the paper's: draw from the policy's distribution, by inverse CDF at u_t)
           <actor>    π(k | s) = softmax_k( g(s, a_k) + log n_k )   (+ log n_k only with its behavior prior)
           behavior   π_β(k | s) = n_k / K      (exactly a sample of π_β: given the draws, the first one is a_k
                                                 with probability n_k / K)
           random     1 / K'                    (uniform over the K' distinct candidates)
         greedy protocol (argmax, ties to the first-drawn)
           <actor>    argmax_k g(s, a_k) + log n_k
           behavior-mode  argmax_k n_k          (π_β's most-drawn candidate: a trained policy whose scores g are
                                                 all equal. The greedy table's bar, always in it)
           critic-greedy  argmax_k A(s, a_k) = max(Q1, Q2)(s, a_k) − max(V1, V2)(s)   (the critic alone: what
                      Best-of-N extraction picks with N = K; a diagnostic of the critic's ranking)
    3. the features come from :class:`~digiq.live_features.LiveFeaturizer` (the embed stage's recipe, the
       channels the model was trained with), reset at each episode start.

K is the candidates stage's ``candidates.k`` (one declaration, no evaluate.k): offline a state's K candidates are
its dataset action (a draw of π_β) and K − 1 further draws, live they are K draws, so n_k counts draws of one π_β
out of the same K in training and at evaluation, and π ∝ n_β · exp g means the same thing in both (one π_β: the
live candidates' noise, evaluate.noise or collect.noise, equals candidates.noise by default). The live cost is
featurization per distinct candidate (the screenshot once per step), which grows with K but far less than K, and
each state's features are computed once per run, whichever methods reach it (the first step of every episode is
the same state for all of them; :mod:`digiq.live_features`).

Statistics. Success rates carry a 95 % Wilson score interval:

    p̂ = s / n,   c = (p̂ + z²/2n) / (1 + z²/n),   h = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²),   CI = [c − h, c + h]

Methods of one protocol play the same (task, seed) episodes, so Digi-Q is compared with each other method by the
exact McNemar test on the pairs: b = episodes only Digi-Q solves, c = episodes only the other solves,

    p = min(1, 2 · P(X ≤ min(b, c))),   X ~ Binomial(b + c, ½)       (p = 1 when b + c = 0)

Episodes per protocol are chosen by the power of that test (:func:`mcnemar_power`, :func:`episodes_for_power`):
the smallest number of pairs that detects, with power 0.8 at α = 0.05 in the claimed direction, a 10-point
success difference with discordance ψ = p10 + p01 = 0.30 when sampling (coupled draws of two different
policies disagree often) and 0.20 greedily (two argmax choosers over the same candidates disagree only where
their rankings' tops differ): 249 and 168 pairs, so 32 and 21 episodes per task over the 8 default tasks
(:data:`PLANNED`). Unpaired Wilson intervals would need several times more, and the two protocols together stay
near one protocol's former live work.

Nothing here imports torch or the VLM at module level: :class:`EvaluateParams` is embedded in the params
model, and the heavy pieces load inside :func:`build_eval_policy` (in each rollout worker).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from digiq.errors import DigiqError

if TYPE_CHECKING:  # kept out of the import path of params loading (`digiq --help` stays fast)
    import numpy as np

    from digiq.envs.view import StepView
    from digiq.schema import Action

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
Protocol = Literal["sample", "greedy"]
PROTOCOLS: tuple[str, ...] = ("sample", "greedy")
BASELINES = ("behavior", "behavior-mode", "random")  # evaluated without a trained model
CRITIC_GREEDY = "critic-greedy"  # chooses with the trained critic (evaluate.critic) instead of a policy
GREEDY_BAR = "behavior-mode"  # always in the greedy table: the bar every greedy method must clear
ONLY_IN = {"behavior": "sample", "random": "sample", GREEDY_BAR: "greedy", CRITIC_GREEDY: "greedy"}
STREAMS = {"candidates": 0, "choice": 1}  # independent generators of one (episode seed, step)
# Planned (p10, p01) per protocol: P(only Digi-Q succeeds), P(only the other succeeds) (module docstring).
PLANNED = {"sample": (0.20, 0.10), "greedy": (0.15, 0.05)}


# ----------------------------------------------------------------------------------------------- params


class EvaluateParams(BaseModel):
    """The ``evaluate:`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    methods: list[str] = Field(default_factory=lambda: ["digiq", "bc", "filtered-bc", "awr", "reinforce", "digirl", "critic-greedy", "behavior", "random"],
                               description="trained policies (models/actor/<method>), critic-greedy and the baselines behavior, "
                                           "random (sample protocol only) and behavior-mode (greedy only, and always in the greedy table)")
    protocols: list[Protocol] = Field(default_factory=lambda: list(PROTOCOLS),
                                      description="sample (draw from each policy, the paper's protocol) and/or greedy (argmax)")
    reference: str = Field("digiq", description="the method every other one of its protocol is compared with (paired McNemar test)")
    tasks: list[str] | None = Field(None, description="MiniWoB++ tasks; null: the collect task set")
    episodes_per_task: dict[str, int] = Field(default_factory=lambda: {"sample": 32, "greedy": 21},
                                              description="episodes per (method, task) of each protocol, chosen by the paired "
                                                          "test's power (digiq/evaluate.py); one number: the same for both")
    seed: int = Field(10000, ge=0, description="base seed of evaluation episodes (fresh: 1000, 3000 and 9000 were seen in earlier runs, docs/results.md); must give seeds disjoint from collect's")
    noise: float | None = Field(None, ge=0.0, le=1.0, description="π_β noise for the candidates; null: collect.noise")
    max_steps: int | None = Field(None, ge=1, description="episode step cap; null: collect.max_steps")
    workers: int = Field(3, ge=1, description="parallel browser processes")
    executor: Literal["local", "ray"] = Field("local", description="where the browsers run: local (processes of this machine) or ray "
                                                               "(actors on the cluster at RAY_ADDRESS, else a local Ray; the digiq[ray] extra)")
    shared_model: bool = Field(False, description="executor ray: one feature model per node that the node's browser actors call, "
                                                  "batching their steps (false: a model in every browser actor)")
    reuse: bool = Field(True, description="every method of a protocol plays each (task, seed) in turn in one browser, and what "
                                          "their episodes share (the same actions from the same first page) is played once "
                                          "(digiq/envs/replay.py); false: every episode is played whole. Results are the same")
    time_limit_s: float = Field(120.0, gt=0, description="MiniWoB episode clock in seconds (raised from 10 s: featurization is slow)")
    episodes_per_unit: int = Field(10, ge=1, description="episodes per result shard (the unit of resume)")
    actors: str = Field("models/actor", description="folder with one trained policy per method")
    critic: str = Field("models/critic", description="trained critic folder that critic-greedy chooses with")
    shards: str = Field("data/eval", description="per-(method, protocol, task, episode block) result shards (resume)")
    out: str = Field("metrics/eval.json", description="evaluation metrics")
    plots: str = Field("plots/eval.csv", description="DVC plot data: protocol, method, task, success, CI")

    @field_validator("methods", "protocols")
    @classmethod
    def _distinct(cls, names: list[str], info: ValidationInfo) -> list[str]:
        from digiq.config import distinct  # here: digiq.config imports this module

        return distinct(names, info.field_name)

    @model_validator(mode="before")
    @classmethod
    def _episodes_per_protocol(cls, values: Any) -> Any:
        """One number of episodes means that number for every protocol."""
        if isinstance(values, dict) and isinstance(values.get("episodes_per_task"), int):
            n = values["episodes_per_task"]
            values = {**values, "episodes_per_task": {p: n for p in values.get("protocols") or PROTOCOLS}}
        return values

    @model_validator(mode="after")
    def _shared_model_on_ray(self) -> EvaluateParams:
        if self.shared_model and self.executor != "ray":
            raise ValueError("shared_model needs executor: ray (the local pool keeps a model per worker)")
        return self

    @model_validator(mode="after")
    def _every_protocol_has_episodes(self) -> EvaluateParams:
        missing = [p for p in self.protocols if p not in self.episodes_per_task]
        bad = {p: n for p, n in self.episodes_per_task.items() if p not in PROTOCOLS or n < 1}
        if missing or bad:
            raise ValueError(f"episodes_per_task needs a count ≥ 1 for each protocol of {self.protocols} "
                             f"(missing {missing}, bad {bad})")
        return self

    def methods_of(self, protocol: str) -> list[str]:
        """The methods of one protocol's table: the listed ones that belong to it, and behavior-mode in greedy."""
        chosen = [m for m in self.methods if ONLY_IN.get(m, protocol) == protocol]
        return chosen + [GREEDY_BAR] if protocol == "greedy" and GREEDY_BAR not in chosen else chosen


# ----------------------------------------------------------------------------------------------- statistics


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (formula above) of a binomial proportion at the two-sided normal quantile ``z``, by
    scipy (``(0, 1)`` when n = 0); clipped to [0, 1] against rounding."""
    from scipy.special import ndtr
    from scipy.stats import binomtest

    if n < 0 or not 0 <= successes <= n:
        raise DigiqError(f"need 0 <= successes <= n, got {successes} of {n}", field="successes")
    if n == 0:
        return 0.0, 1.0
    interval = binomtest(successes, n).proportion_ci(confidence_level=1 - 2 * ndtr(-z), method="wilson")
    return max(0.0, float(interval.low)), min(1.0, float(interval.high))


def success_summary(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Success rate, its 95 % Wilson interval, mean episode length and counts of a list of episode summaries."""
    n = len(episodes)
    wins = sum(bool(e["success"]) for e in episodes)
    low, high = wilson_interval(wins, n)
    return {
        "episodes": n,
        "successes": wins,
        "success": wins / n if n else 0.0,
        "ci95": [round(low, 4), round(high, 4)],
        "mean_steps": sum(e["steps"] for e in episodes) / n if n else 0.0,
        "timed_out": sum(bool(e.get("timed_out")) for e in episodes),
        "step_cap": sum(not e.get("terminated", True) for e in episodes),
    }


def summarise_method(episodes: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Overall (pooled over tasks) and per-task summaries of one method."""
    return {**success_summary(episodes),
            "per_task": {t: success_summary([e for e in episodes if e["task"] == t]) for t in tasks}}


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of b and c discordant pairs: min(1, 2 · P(X ≤ min(b, c))), X ~ Bin(b + c, ½)."""
    from scipy.stats import binom

    if b < 0 or c < 0:
        raise DigiqError(f"discordant counts must be ≥ 0, got b={b}, c={c}", field="b")
    return 1.0 if b + c == 0 else min(1.0, 2.0 * float(binom.cdf(min(b, c), b + c, 0.5)))


def paired_comparison(reference: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """McNemar's comparison of two methods' episodes paired by (task, seed): n pairs, b (only ``reference``
    succeeds), c (only ``other``), the exact p-value and the success difference (b − c) / n."""
    theirs = {(e["task"], e["seed"]): bool(e["success"]) for e in other}
    pairs = [(bool(e["success"]), theirs[key]) for e in reference if (key := (e["task"], e["seed"])) in theirs]
    b = sum(mine and not them for mine, them in pairs)
    c = sum(them and not mine for mine, them in pairs)
    return {"n": len(pairs), "b": b, "c": c, "p": mcnemar_p(b, c), "difference": (b - c) / len(pairs) if pairs else 0.0}


def paired_section(episodes: dict[str, list[dict[str, Any]]], reference: str, tasks: list[str]) -> dict[str, Any]:
    """``reference`` against every other method of one protocol: pooled, and per task."""
    if reference not in episodes:
        return {}
    mine = episodes[reference]
    return {other: {**paired_comparison(mine, eps),
                    "per_task": {t: paired_comparison([e for e in mine if e["task"] == t], [e for e in eps if e["task"] == t])
                                 for t in tasks}}
            for other, eps in episodes.items() if other != reference}


def mcnemar_power(n: int, p10: float, p01: float, alpha: float = 0.05) -> float:
    """Power of the exact McNemar test at level ``alpha`` to find the reference better, over ``n`` pairs whose
    outcomes are (reference only) with probability p10 and (other only) with p01:

        Σ_d P(D = d) · P(C ≤ c*_d | d),   D ~ Bin(n, p10 + p01),   C | d ~ Bin(d, p01 / (p10 + p01)),

    c*_d the largest c with mcnemar_p(d − c, c) < alpha (no term when there is none)."""
    import numpy as np
    from scipy.stats import binom

    psi = p10 + p01
    if not 0 < psi <= 1 or n < 1:
        raise DigiqError(f"need n ≥ 1 and 0 < p10 + p01 ≤ 1, got n={n}, p10={p10}, p01={p01}", field="p10")
    power = 0.0
    for d, weight in enumerate(binom.pmf(np.arange(n + 1), n, psi)):
        tail = 2.0 * binom.cdf(np.arange(d + 1), d, 0.5)  # the p-value of c discordant pairs against the reference
        critical = np.flatnonzero(tail < alpha)
        if critical.size and weight > 1e-15:
            power += weight * float(binom.cdf(critical[-1], d, p01 / psi))
    return power


def episodes_for_power(p10: float, p01: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """The fewest pairs whose exact McNemar test reaches ``power`` (:func:`mcnemar_power`), searched upwards from
    0.8 × the normal approximation n ≈ (z_{α/2} √ψ + z_power √(ψ − δ²))² / δ², δ = p10 − p01, ψ = p10 + p01."""
    from scipy.stats import norm

    delta, psi = p10 - p01, p10 + p01
    if delta <= 0:
        raise DigiqError(f"the planned effect p10 − p01 must be > 0, got {delta}", field="p10")
    approx = (norm.ppf(1 - alpha / 2) * math.sqrt(psi) + norm.ppf(power) * math.sqrt(psi - delta**2)) ** 2 / delta**2
    n = max(1, int(0.8 * approx))
    while mcnemar_power(n, p10, p01, alpha) < power:
        n += 1
    return n


def planned_episodes_per_task(tasks: int) -> dict[str, int]:
    """episodes_per_task per protocol from :data:`PLANNED`: ⌈pairs needed / tasks⌉."""
    return {protocol: math.ceil(episodes_for_power(*effect) / tasks) for protocol, effect in PLANNED.items()}


# ----------------------------------------------------------------------------------------------- live policy


def step_rng(seed: int, step: int, stream: str) -> np.random.Generator:
    """The generator of one (episode seed, step) and stream ("candidates" or "choice"): a function of these alone,
    the same for every method."""
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), STREAMS[stream]]))


def candidate_set(behavior: Any, view: StepView, k: int, rng: np.random.Generator) -> tuple[list[Action], list[int]]:
    """K draws from π_β(· | view), duplicates (same :func:`~digiq.feature_contract.semantic_key`) dropped, first-draw
    order kept; returns (the distinct actions, how many of the K draws each stands for)."""
    from digiq.feature_contract import key_classes, semantic_key

    draws = behavior.sample(view, k, rng)
    classes = key_classes(semantic_key(action, view.elements) for action in draws).values()
    return [draws[first] for first, _ in classes], [count for _, count in classes]


def inverse_cdf(weights: list[float], u: float) -> int:
    """The index k of the first cumulative weight above u · Σ weights (a draw ∝ ``weights`` at the uniform u)."""
    total, running = sum(weights), 0.0
    for k, w in enumerate(weights):
        running += w
        if w > 0 and running > u * total:
            return k
    return max(k for k, w in enumerate(weights) if w > 0)


@dataclass
class EvalPolicy:
    """π_β proposes, ``method`` picks under ``protocol``. Implements the rollout Policy protocol (reset, act)."""

    method: str
    k: int
    noise: float
    protocol: str = "greedy"
    featurizer: Any = None  # LiveFeaturizer for trained choosers
    actor: Any = None  # CandidatePolicy for trained policies, CriticGreedy for critic-greedy
    inputs: Any = None  # the channels the trained chooser reads (its config.inputs; None: the VLM feature alone)
    behavior_scores: dict[str, float] = field(default_factory=dict)  # π_β's changed heuristic weights (collect.behavior)
    behavior: Any = field(init=False)
    seed: int = field(init=False, default=0)
    step: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if ONLY_IN.get(self.method, self.protocol) != self.protocol or self.protocol not in PROTOCOLS:
            raise DigiqError(f"method {self.method!r} has no {self.protocol!r} protocol", field="evaluate.protocols")
        self.behavior = _behavior(self.noise, self.behavior_scores)
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.seed, self.step = seed, 0
        if self.featurizer is not None:
            self.featurizer.reset()

    def act(self, view: StepView) -> Action:
        candidates, draws = candidate_set(self.behavior, view, self.k, step_rng(self.seed, self.step, "candidates"))
        u = float(step_rng(self.seed, self.step, "choice").random())
        self.step += 1
        return candidates[self.choose(view, candidates, draws, u)]

    def choose(self, view: StepView, candidates: list[Action], draws: list[int], u: float = 0.0) -> int:
        if self.method == "behavior":
            return inverse_cdf([float(n) for n in draws], u)
        if self.method == GREEDY_BAR:
            return draws.index(max(draws))
        if self.method == "random":
            return inverse_cdf([1.0] * len(candidates), u)
        import torch

        s, cand_sa = self.featurizer(view, candidates, self.inputs)
        mask = torch.ones(1, len(candidates), dtype=torch.bool)
        logits = self.actor.logits(s, cand_sa, mask, torch.tensor([draws], dtype=torch.float32))[0]
        if self.protocol == "greedy":
            from digiq.critic import first_argmax

            return int(first_argmax(logits.unsqueeze(0))[0])
        return inverse_cdf(torch.softmax(logits.double(), dim=-1).tolist(), u)


class CriticGreedy:
    """Chooses argmax_k A(s, a_k) of a trained :class:`~digiq.critic.DoubleCritic` (ties: the first-drawn), with
    :class:`CandidatePolicy`'s ``logits`` and ``act`` signatures so that :class:`EvalPolicy` serves both."""

    def __init__(self, critic: Any):
        self.critic, self.d_s, self.d_sa, self.config = critic, critic.d_s, critic.d_sa, critic.config

    def logits(self, s: Any, cand_sa: Any, mask: Any, count: Any) -> Any:
        import torch

        from digiq.critic import advantage

        return advantage(self.critic, s, cand_sa).masked_fill(~mask, -torch.inf)

    def act(self, s: Any, cand_sa: Any, mask: Any, count: Any, mode: str = "argmax") -> Any:
        from digiq.critic import first_argmax

        return first_argmax(self.logits(s, cand_sa, mask, count))


def _behavior(noise: float, scores: dict[str, float]) -> Any:
    from digiq.envs.behavior import BehaviorPolicy

    return BehaviorPolicy(noise=noise, scores=scores)


def build_eval_policy(method: str, k: int, noise: float, protocol: str = "greedy", actor_dir: str | None = None,
                      features: dict[str, Any] | None = None, threads: int = 1,
                      behavior: dict[str, float] | None = None, feature_cache: str | None = None,
                      featurizer: Any = None) -> EvalPolicy:
    """The policy of ``method`` under ``protocol`` (a rollout-worker factory: ``digiq.evaluate:build_eval_policy``);
    ``actor_dir`` is the trained policy's folder, or the critic's for critic-greedy; ``features`` the
    :class:`~digiq.live_features.LiveFeaturizer` recipe, ``feature_cache`` the run's shared feature folder;
    ``featurizer`` one already built (``reset()``, ``dims(inputs)``, ``(view, candidates, inputs) -> (x_V, x_Q)``,
    e.g. a node's shared model), used instead of building one from ``features``."""
    behavior = dict(behavior or {})
    if method in BASELINES:
        return EvalPolicy(method, k, noise, protocol, behavior_scores=behavior)
    if actor_dir is None or (features is None and featurizer is None):
        raise DigiqError(f"method {method!r} needs a trained policy folder and its feature recipe", field="actor_dir")
    import torch

    torch.set_num_threads(threads)
    actor = _load_chooser(method, actor_dir)
    inputs = getattr(actor.config, "inputs", None)
    if featurizer is None:
        featurizer = shared_featurizer(features, feature_cache)
    dims = featurizer.dims(inputs)
    if (actor.d_s, actor.d_sa) != dims:
        raise DigiqError(f"the policy expects features of width (x_V {actor.d_s}, x_Q {actor.d_sa}) but variant "
                         f"{featurizer.variant!r} of {featurizer.model} gives {dims}: evaluate with the "
                         f"features the policy was trained on", file=actor_dir, field="features.variant")
    return EvalPolicy(method, k, noise, protocol, featurizer=featurizer, actor=actor, inputs=inputs, behavior_scores=behavior)


_FEATURIZERS: dict[str, Any] = {}  # one model per process, whichever of its policies asks


def shared_featurizer(features: dict[str, Any] | None, cache: str | None) -> Any:
    """The process's :class:`~digiq.live_features.LiveFeaturizer` of this recipe and cache: the policies of a worker
    play one episode at a time (each ``reset()`` starts its episode), so they can share one model."""
    from digiq.live_features import LiveFeaturizer

    key = json.dumps([features, cache], sort_keys=True, default=str)
    if key not in _FEATURIZERS:
        _FEATURIZERS[key] = LiveFeaturizer(**(features or {}), cache=cache)
    return _FEATURIZERS[key]


def _load_chooser(method: str, folder: str) -> Any:
    if method == CRITIC_GREEDY:
        from digiq.critic import DoubleCritic

        return CriticGreedy(DoubleCritic.from_pretrained(folder))
    from digiq.actor import CandidatePolicy

    return CandidatePolicy.from_pretrained(folder)
