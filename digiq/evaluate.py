"""Online evaluation: a policy picks among π_β's candidates, live, in MiniWoB++.

Each live step of every evaluated method is built the same way, so methods differ only in the choice:

    1. π_β proposes K candidates:  a_1 … a_K ~ π_β(· | s)   (draws from a generator seeded by the episode;
       duplicates by what they do dropped (taps: the element under the point), first-draw order kept;
       n_k = how many of the K draws the kept a_k stands for)
    2. a chooser picks one:
         behavior   a_1                       (the first draw: exactly a sample of π_β)
         behavior-mode  argmax_k n_k          (π_β's most-drawn candidate, first-drawn on ties: a trained policy
                                               whose scores g are all equal, and what π_β would do without its noise)
         random     a_k, k ~ Uniform{1 … K'}   (uniform over the K' distinct candidates)
         <actor>    argmax_k π(k | s) = argmax_k MLP([f(s), f(s, a_k)]) + log n_k   (a trained CandidatePolicy;
                    + log n_k only with its behavior prior, as in training)
         critic-greedy  argmax_k A(s, a_k) = max(Q1, Q2)(s, a_k) − max(V1, V2)(s)   (the trained critic alone, no
                    policy and no prior: what Best-of-N extraction would pick with N = K. A diagnostic of the
                    critic's ranking: it separates a critic that ranks badly from an actor that imitates badly)
    3. f(s) and f(s, a_k) come from the frozen VLM; the screenshot is encoded once per step and every
       candidate reuses the encoding.

Success rates carry a 95 % Wilson score interval (it stays inside [0, 1] and behaves at 0 and n):

    p̂ = s / n,   c = (p̂ + z²/2n) / (1 + z²/n),   h = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²),   CI = [c − h, c + h]

Nothing here imports torch or the VLM at module level: :class:`EvaluateParams` is embedded in the params
model, and the heavy pieces load inside :func:`build_eval_policy` (in each rollout worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from digiq.errors import DigiqError

if TYPE_CHECKING:  # kept out of the import path of params loading (`digiq --help` stays fast)
    import numpy as np

    from digiq.envs.view import StepView
    from digiq.schema import Action

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
BASELINES = ("behavior", "behavior-mode", "random")  # evaluated without a trained model
CRITIC_GREEDY = "critic-greedy"  # chooses with the trained critic (evaluate.critic) instead of a policy


# ----------------------------------------------------------------------------------------------- params


class EvaluateParams(BaseModel):
    """The ``evaluate:`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    methods: list[str] = Field(default_factory=lambda: ["digiq", "bc", "filtered-bc", "awr", "reinforce", "behavior", "random"],
                               description="trained policies (models/actor/<method>) and the baselines behavior and random; "
                                           "also available: critic-greedy (argmax A of the critic) and behavior-mode")
    tasks: list[str] | None = Field(None, description="MiniWoB++ tasks; null: the collect task set")
    episodes_per_task: int = Field(50, ge=1, description="episodes per (method, task)")
    seed: int = Field(1000, ge=0, description="base seed of evaluation episodes; must give seeds disjoint from collect's")
    k: int = Field(16, ge=1, description="candidates drawn from π_β per live step")
    noise: float | None = Field(None, ge=0.0, le=1.0, description="π_β noise for the candidates; null: collect.noise")
    max_steps: int | None = Field(None, ge=1, description="episode step cap; null: collect.max_steps")
    workers: int = Field(3, ge=1, description="parallel browser processes")
    time_limit_s: float = Field(120.0, gt=0, description="MiniWoB episode clock in seconds (raised from 10 s: featurization is slow)")
    episodes_per_unit: int = Field(10, ge=1, description="episodes per result shard (the unit of resume)")
    actors: str = Field("models/actor", description="folder with one trained policy per method")
    critic: str = Field("models/critic", description="trained critic folder that critic-greedy chooses with")
    shards: str = Field("data/eval", description="per-(method, task, episode block) result shards (resume)")
    out: str = Field("metrics/eval.json", description="evaluation metrics")
    plots: str = Field("plots/eval.csv", description="DVC plot data: method, task, success, CI")

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, methods: list[str]) -> list[str]:
        from digiq.config import distinct  # here: digiq.config imports this module

        return distinct(methods, "methods")


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


# ----------------------------------------------------------------------------------------------- live policy


def candidate_set(behavior: Any, view: StepView, k: int, rng: np.random.Generator) -> tuple[list[Action], list[int]]:
    """K draws from π_β(· | view), duplicates (same :func:`~digiq.feature_contract.semantic_key`) dropped, first-draw
    order kept; returns (the distinct actions, how many of the K draws each stands for)."""
    from digiq.feature_contract import key_classes, semantic_key

    draws = behavior.sample(view, k, rng)
    classes = key_classes(semantic_key(action, view.elements) for action in draws).values()
    return [draws[first] for first, _ in classes], [count for _, count in classes]


class LiveFeaturizer:
    """f(s) [1, d_s] and f(s, a_k) [1, K, d_sa] of a live state, by the embed stage's own extractor and recipe
    (``variant``, ``model``: its checkpoint folder, and embed's ``layer``, ``pooling``, ``dtype``, ``device``)."""

    def __init__(self, variant: str, model: str, layer: int, pooling: str, dtype: str, device: str):
        from digiq.extractor import build_extractor

        self.variant, self.model = variant, model
        self.extractor, self.model_hash, _ = build_extractor(variant, model, layer=layer, pooling=pooling, dtype=dtype,
                                                             device=device)

    def __call__(self, view: StepView, actions: list[Action]) -> tuple[Any, Any]:
        import torch
        from PIL import Image

        from digiq.extractor import featurize

        if view.screenshot is None:
            raise DigiqError("a live step has no screenshot", field="screenshot")
        f_s, f_sa = featurize(self.extractor, Image.fromarray(view.screenshot), view.goal, view.observation, actions,
                              view.elements)
        return torch.from_numpy(f_s).unsqueeze(0), torch.from_numpy(f_sa).unsqueeze(0)


@dataclass
class EvalPolicy:
    """π_β proposes, ``chooser`` picks. Implements the rollout Policy protocol (reset, act)."""

    method: str
    k: int
    noise: float
    featurizer: Any = None  # LiveFeaturizer for trained policies
    actor: Any = None  # CandidatePolicy for trained policies, CriticGreedy for critic-greedy
    behavior_scores: dict[str, float] = field(default_factory=dict)  # π_β's changed heuristic weights (collect.behavior)
    behavior: Any = field(init=False)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.behavior = _behavior(self.noise, self.behavior_scores)
        self.reset(0)

    def reset(self, seed: int) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)

    def act(self, view: StepView) -> Action:
        candidates, draws = candidate_set(self.behavior, view, self.k, self.rng)
        return candidates[self.choose(view, candidates, draws)]

    def choose(self, view: StepView, candidates: list[Action], draws: list[int]) -> int:
        if self.method == "behavior":
            return 0
        if self.method == "behavior-mode":
            return draws.index(max(draws))
        if self.method == "random":
            return int(self.rng.integers(len(candidates)))
        import torch

        s, cand_sa = self.featurizer(view, candidates)
        mask = torch.ones(1, len(candidates), dtype=torch.bool)
        count = torch.tensor([draws], dtype=torch.float32)
        return int(self.actor.act(s, cand_sa, mask, count, mode="argmax")[0])


class CriticGreedy:
    """Chooses argmax_k A(s, a_k) of a trained :class:`~digiq.critic.DoubleCritic` (ties: the first-drawn),
    with :meth:`CandidatePolicy.act`'s signature so that :class:`EvalPolicy` serves both."""

    def __init__(self, critic: Any):
        self.critic, self.d_s, self.d_sa = critic, critic.d_s, critic.d_sa

    def act(self, s: Any, cand_sa: Any, mask: Any, count: Any, mode: str = "argmax") -> Any:
        from digiq.critic import advantage, first_argmax

        return first_argmax(advantage(self.critic, s, cand_sa).masked_fill(~mask, math.nan))


def _behavior(noise: float, scores: dict[str, float]) -> Any:
    from digiq.envs.behavior import BehaviorPolicy

    return BehaviorPolicy(noise=noise, scores=scores)


def build_eval_policy(method: str, k: int, noise: float, actor_dir: str | None = None,
                      features: dict[str, Any] | None = None, threads: int = 1,
                      behavior: dict[str, float] | None = None) -> EvalPolicy:
    """The policy of ``method`` (a rollout-worker factory: ``digiq.evaluate:build_eval_policy``); ``actor_dir`` is
    the trained policy's folder, or the critic's for critic-greedy; ``features`` the :class:`LiveFeaturizer` recipe."""
    behavior = dict(behavior or {})
    if method in BASELINES:
        return EvalPolicy(method, k, noise, behavior_scores=behavior)
    if actor_dir is None or features is None:
        raise DigiqError(f"method {method!r} needs a trained policy folder and its feature recipe", field="actor_dir")
    import torch

    torch.set_num_threads(threads)
    actor = _load_chooser(method, actor_dir)
    featurizer = LiveFeaturizer(**features)
    dims = (featurizer.extractor.dim_state, featurizer.extractor.dim_candidate)
    if (actor.d_s, actor.d_sa) != dims:
        raise DigiqError(f"the policy expects features of width (f(s) {actor.d_s}, f(s,a) {actor.d_sa}) but variant "
                         f"{featurizer.variant!r} of {featurizer.model} gives {dims}: evaluate with the "
                         f"features the policy was trained on", file=actor_dir, field="features.variant")
    return EvalPolicy(method, k, noise, featurizer=featurizer, actor=actor, behavior_scores=behavior)


def _load_chooser(method: str, folder: str) -> Any:
    if method == CRITIC_GREEDY:
        from digiq.critic import DoubleCritic

        return CriticGreedy(DoubleCritic.from_pretrained(folder))
    from digiq.actor import CandidatePolicy

    return CandidatePolicy.from_pretrained(folder)
