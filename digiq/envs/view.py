"""What a policy sees: one state as a :class:`StepView`.

The same view is built from a live MiniWoB state (``StepView.live``) and from a stored step
(``StepView.from_step``), so a policy behaves identically online and when re-sampling candidates offline.

The observation text follows the official DigiRL / Digi-Q code::

    prompt = "Previous Actions: "
    for act in history[-window:]:
        prompt += f"{to_autoui(act)} "
    prompt += f"Goal: {task}</s>"

where ``to_autoui`` writes the AutoUI action decision (``format_action`` without a plan). The official
code keeps the last action (window 1); AutoUI kept 8.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from digiq.actions import format_action, parse_action
from digiq.errors import DigiqError
from digiq.schema import Action, Step

OBSERVATION_PREFIX = "Previous Actions: "
GOAL_PREFIX = "Goal: "
END_OF_TEXT = "</s>"
_DECISION_START = re.compile(r'"action_type": "')


def observation_text(goal: str, history: list[Action], window: int) -> str:
    """``Previous Actions: <last `window` actions as AutoUI decisions> Goal: <goal></s>``."""
    shown = history[-window:] if window > 0 else []
    actions = "".join(f"{format_action(a.model_copy(update={'plan': None}))} " for a in shown)
    return f"{OBSERVATION_PREFIX}{actions}{GOAL_PREFIX}{goal}{END_OF_TEXT}"


def previous_actions(observation: str, goal: str) -> list[Action]:
    """The actions listed in an observation text written by :func:`observation_text`."""
    suffix = f"{GOAL_PREFIX}{goal}{END_OF_TEXT}"
    if not observation.startswith(OBSERVATION_PREFIX) or not observation.endswith(suffix):
        raise DigiqError(f"not an observation text of the form 'Previous Actions: … Goal: {goal}</s>'", field="observation")
    body = observation[len(OBSERVATION_PREFIX) : len(observation) - len(suffix)]
    starts = [m.start() for m in _DECISION_START.finditer(body)]
    pieces = [body[a:b].rstrip(" ") for a, b in zip(starts, [*starts[1:], len(body)])]
    return [parse_action(piece) for piece in pieces]


@dataclass
class StepView:
    """One state as a policy sees it."""

    task: str
    goal: str
    observation: str
    elements: list[dict[str, Any]]
    previous_actions: list[Action] = field(default_factory=list)
    screenshot: np.ndarray | None = None  # H×W×3 uint8 (live); offline views leave it None unless loaded

    @classmethod
    def live(cls, task: str, goal: str, elements: list[dict[str, Any]], history: list[Action], window: int, screenshot: np.ndarray | None = None) -> StepView:
        shown = history[-window:] if window > 0 else []
        return cls(task, goal, observation_text(goal, history, window), elements, list(shown), screenshot)

    @classmethod
    def from_step(cls, step: Step) -> StepView:
        return cls(
            task=step.task,
            goal=step.goal,
            observation=step.observation,
            elements=parse_elements(step.elements),
            previous_actions=list(_parse_previous(step.observation, step.goal)),
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StepView:
        """From a step-table row (dict with task, goal, observation, elements) without building a Step."""
        return cls(
            task=row["task"],
            goal=row["goal"],
            observation=row["observation"],
            elements=parse_elements(row.get("elements")),
            previous_actions=list(_parse_previous(row["observation"], row["goal"])),
        )


@lru_cache(maxsize=4096)
def _parse_previous(observation: str, goal: str) -> tuple[Action, ...]:
    return tuple(previous_actions(observation, goal))


def parse_elements(text: str | None) -> list[dict[str, Any]]:
    if not text:
        return []
    try:
        elements = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DigiqError(f"elements is not valid JSON ({exc.msg})", field="elements") from None
    if not isinstance(elements, list):
        raise DigiqError("elements must be a JSON list", field="elements")
    return elements
