"""One episode of a policy in a MiniWoB env, and its conversion to a stored trajectory.

Conventions of the stored data:
* reward 1 on the last step when MiniWoB's raw reward is > 0 (success), else 0 everywhere;
* ``done`` is True on the last step of every trajectory — the page ended the episode, the policy
  declared completion, or the step cap was reached (as in the official DigiRL/Digi-Q data);
* the next frame of the last step is the page as the final action left it (never MiniWoB's black
  terminal frame); other steps' next frame is the following state's frame.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from digiq.actions import describe_action
from digiq.envs.behavior import tap_target
from digiq.envs.miniwob import Observation, StepResult
from digiq.envs.policy import Policy
from digiq.envs.view import StepView
from digiq.schema import Action, Step, Trajectory

_SEED_SPACE = 2**31 - 1


def episode_seed(seed: int, task: str, index: int) -> int:
    """The seed of episode ``index`` of ``task`` under base ``seed`` (independent of workers and order)."""
    digest = hashlib.sha256(f"digiq/miniwob/{seed}/{task}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _SEED_SPACE


def trajectory_id(task: str, seed: int, index: int) -> str:
    return f"{task}.s{seed}.e{index:05d}"


@dataclass
class Episode:
    """Everything one episode produced (frames in memory; see :func:`to_trajectory`)."""

    task: str
    index: int
    seed: int  # the episode's own seed (env reset and policy)
    goal: str
    frames: list[np.ndarray] = field(default_factory=list)  # s_0 … s_{T-1}
    elements: list[list[dict[str, Any]]] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    final_frame: np.ndarray | None = None  # the page after the last action
    raw_reward: float = 0.0
    terminated: bool = False  # the page (or a task-complete action) ended it, vs the step cap
    timed_out: bool = False
    failed_steps: int = 0
    retries: int = 0  # browser restarts this episode needed (it is replayed from its seed)

    @property
    def success(self) -> bool:
        return self.raw_reward > 0

    @property
    def length(self) -> int:
        return len(self.actions)

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "index": self.index,
            "seed": self.seed,
            "steps": self.length,
            "success": self.success,
            "raw_reward": self.raw_reward,
            "terminated": self.terminated,
            "timed_out": self.timed_out,
            "failed_steps": self.failed_steps,
            "retries": self.retries,
            "goal": self.goal,
            "actions": [action_description(a, els) for a, els in zip(self.actions, self.elements)],
        }


def action_description(action: Action, elements: list[dict[str, Any]]) -> str:
    """The action as a reader wants it in a result file, a tap named by the control under it:
    ``tap (y=0.41, x=0.30) on "input#password"``."""
    return describe_action(action, tap_target(action, elements))


class Env(Protocol):
    """What an episode is played in: a :class:`~digiq.envs.miniwob.MiniWoBEnv`, or a
    :class:`~digiq.envs.replay.ReplayingEnv` over one."""

    @property
    def task(self) -> str: ...

    def reset(self, seed: int) -> Observation: ...

    def step(self, action: Action) -> StepResult: ...


def run_episode(
    env: Env,
    policy: Policy,
    *,
    index: int,
    seed: int,
    max_steps: int,
    history: int = 1,
    on_step: Callable[[], None] | None = None,
) -> Episode:
    """Play one episode: reset(seed) → act/step until the page ends it or ``max_steps`` steps."""
    policy.reset(seed)
    obs = env.reset(seed)
    episode = Episode(task=env.task, index=index, seed=seed, goal=obs.goal)
    for _ in range(max_steps):
        view = StepView.live(env.task, obs.goal, obs.elements, episode.actions, history, obs.screenshot)
        action = policy.act(view)
        result = env.step(action)
        episode.frames.append(obs.screenshot)
        episode.elements.append(obs.elements)
        episode.observations.append(view.observation)
        episode.actions.append(action)
        episode.failed_steps += int(result.failed)
        if on_step is not None:
            on_step()
        if result.done:
            episode.final_frame = result.final_screenshot
            episode.raw_reward = result.raw_reward
            episode.terminated = True
            episode.timed_out = result.timed_out
            return episode
        assert result.observation is not None
        obs = result.observation
    episode.final_frame = obs.screenshot  # step cap: the next state is a real, live page
    return episode


def to_trajectory(episode: Episode, put_image: Callable[[np.ndarray], tuple[str, str]], traj_id: str) -> Trajectory:
    """Store the frames (``put_image`` → (relative path, sha256)) and build the trajectory's steps."""
    images = [put_image(frame) for frame in episode.frames]
    final = put_image(episode.final_frame) if episode.final_frame is not None else (None, None)
    last = episode.length - 1
    steps = [
        Step(
            traj_id=traj_id,
            step_id=t,
            task=episode.task,
            seed=episode.seed,
            goal=episode.goal,
            observation=episode.observations[t],
            screenshot=images[t][0],
            screenshot_sha256=images[t][1],
            next_screenshot=images[t + 1][0] if t < last else final[0],
            next_screenshot_sha256=images[t + 1][1] if t < last else final[1],
            elements=elements_json(episode.elements[t]),
            action=episode.actions[t],
            reward=1.0 if t == last and episode.success else 0.0,
            done=t == last,
        )
        for t in range(episode.length)
    ]
    return Trajectory(traj_id=traj_id, task=episode.task, goal=episode.goal, steps=steps)


def elements_json(elements: list[dict[str, Any]]) -> str:
    return json.dumps(elements, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
