"""Episodes that begin alike are played in the browser once.

A MiniWoB episode depends only on (task, seed, actions so far) (DESIGN.md §6: the page is reloaded before every
episode and its screenshots are byte-identical), so when several policies play the same (task, seed) — every method
of an evaluation does — each of them sees the same page after the same actions. :class:`EpisodeTree` keeps, for one
(task, seed), what the page showed after each action prefix; :class:`ReplayingEnv` answers ``reset``/``step`` from it
and drives the browser only for a prefix no policy has played yet. When the browser stands somewhere else, it first
replays that prefix from the seed, checking every replayed page against the tree, so a page that does not repeat
stops the run instead of changing a result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from digiq.envs.miniwob import MiniWoBEnv, Observation, StepResult
from digiq.errors import DigiqError
from digiq.schema import Action

Prefix = tuple[Action, ...]  # the actions of an episode so far


@dataclass
class EpisodeTree:
    """What the page of (task, seed) showed after each action prefix: the reset observation under ``()``, a step's
    result under the actions up to and including it."""

    task: str
    seed: int
    nodes: dict[Prefix, Observation | StepResult] = field(default_factory=dict)


@dataclass
class ReplayCounts:
    """Where each step of the episodes played so far came from."""

    browser: int = 0  # resets and steps the browser played for a new prefix
    reused: int = 0  # answered from the tree, no browser
    replayed: int = 0  # resets and steps played again to bring the browser to a prefix

    def as_dict(self) -> dict[str, int]:
        return {"browser": self.browser, "reused": self.reused, "replayed": self.replayed}


class ReplayingEnv:
    """``reset(seed)`` / ``step(action)`` of :class:`~digiq.envs.miniwob.MiniWoBEnv`, answered from the tree of the
    current (task, seed) where it can (``reuse``; without it, every episode is played whole in the browser). The
    browser under it may be replaced (:meth:`attach`) after a crash; the tree survives."""

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self.env: MiniWoBEnv | None = None
        self.tree: EpisodeTree | None = None
        self.path: Prefix = ()
        self.at: Prefix | None = None  # the prefix the browser's page stands at in the tree's episode (None: unknown or ended)
        self.counts = ReplayCounts()

    def attach(self, env: MiniWoBEnv) -> None:
        if env is not self.env:
            self.env, self.at = env, None

    @property
    def task(self) -> str:
        assert self.env is not None
        return self.env.task

    def reset(self, seed: int) -> Observation:
        if not self.reuse or self.tree is None or (self.tree.task, self.tree.seed) != (self.task, seed):
            self.tree, self.at = EpisodeTree(self.task, seed), None
        self.path = ()
        node = self._node((), self._play_reset)
        assert isinstance(node, Observation)
        return node

    def step(self, action: Action) -> StepResult:
        prefix, self.path = self.path, (*self.path, action)
        node = self._node(self.path, lambda: self._play_step(prefix, action))
        assert isinstance(node, StepResult)
        return node

    def _node(self, path: Prefix, play: Any) -> Observation | StepResult:
        assert self.tree is not None
        node = self.tree.nodes.get(path)
        if node is None:
            node = self.tree.nodes[path] = play()
            self.counts.browser += 1
        else:
            self.counts.reused += 1
        return node

    def _browser(self) -> MiniWoBEnv:
        if self.env is None:
            raise DigiqError("no browser attached", field="env")
        return self.env

    def _play_reset(self) -> Observation:
        assert self.tree is not None
        obs = self._browser().reset(self.tree.seed)
        self.at = ()
        return obs

    def _play_step(self, prefix: Prefix, action: Action) -> StepResult:
        if self.at != prefix:
            self._replay(prefix)
        self.at = None  # until the step is known to have left the page standing
        result = self._browser().step(action)
        self.at = None if result.done else (*prefix, action)
        return result

    def _replay(self, prefix: Prefix) -> None:
        """Bring the browser to ``prefix`` from the seed, checking each page against the tree."""
        assert self.tree is not None
        self.at = None
        env = self._browser()
        self._check((), env.reset(self.tree.seed))
        for t in range(len(prefix)):
            self._check(prefix[: t + 1], env.step(prefix[t]))
        self.counts.replayed += len(prefix) + 1
        self.at = prefix

    def _check(self, path: Prefix, got: Observation | StepResult) -> None:
        assert self.tree is not None
        if not same_page(self.tree.nodes[path], got):
            raise DigiqError(
                f"{self.tree.task} seed {self.tree.seed}: the page after {len(path)} action(s) differed when the "
                f"episode was replayed, so episodes of this task are not determined by (task, seed, actions); "
                f"set evaluate.reuse: false to play every episode whole", field="evaluate.reuse")


def same_page(a: Observation | StepResult | None, b: Observation | StepResult | None) -> bool:
    """Whether two resets or steps left the same page: goal, screenshot, elements, and a step's outcome."""
    if isinstance(a, StepResult) and isinstance(b, StepResult):
        outcome = (a.raw_reward, a.done, a.timed_out, a.failed) == (b.raw_reward, b.done, b.timed_out, b.failed)
        return outcome and same_page(a.observation, b.observation)
    if isinstance(a, Observation) and isinstance(b, Observation):
        return a.goal == b.goal and a.elements == b.elements and np.array_equal(a.screenshot, b.screenshot)
    return a is None and b is None
