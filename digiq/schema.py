"""Data contracts: the AitW/AutoUI action language, steps and trajectories.

Coordinates are ``[y, x]`` in ``[0, 1]`` as in Android-in-the-Wild. Non-point actions carry
``(-1.0, -1.0)`` exactly as the official data writes them.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NO_POINT: tuple[float, float] = (-1.0, -1.0)
# AitW's action_matching: touch and lift closer than this (normalised units) is a tap, farther a swipe.
SWIPE_DISTANCE_THRESHOLD = 0.04
SCHEMA_VERSION = 1
DEFAULT_DECIMALS = 4  # AutoUI writes coordinates with 4 decimals
MAX_DECIMALS = 12
# the AutoUI string form: [PLAN_PREFIX plan PLAN_END] decision (digiq.actions parses it)
PLAN_PREFIX = "Action Plan: ["
PLAN_END = "] ; Action Decision: "  # ends the plan in the string form, so a plan cannot contain it
NO_POINT_TEXT = "-1.0, -1.0"


class ActionType(str, Enum):
    DUAL_POINT = "DUAL_POINT"
    TYPE = "TYPE"
    PRESS_BACK = "PRESS_BACK"
    PRESS_HOME = "PRESS_HOME"
    PRESS_ENTER = "PRESS_ENTER"
    STATUS_TASK_COMPLETE = "STATUS_TASK_COMPLETE"


class Action(BaseModel):
    """One action of the AitW action language.

    ``plan`` is the free text inside ``Action Plan: [...]`` (None when the string had no plan part);
    ``decimals`` is how many decimals the point coordinates are written with (None: shortest repr).
    Both exist so that parsing then formatting reproduces the official strings exactly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    action_type: ActionType
    touch_point: tuple[float, float] = NO_POINT
    lift_point: tuple[float, float] = NO_POINT
    typed_text: str = ""
    plan: str | None = None
    decimals: int | None = Field(default=DEFAULT_DECIMALS, ge=0, le=MAX_DECIMALS)

    @field_validator("touch_point", "lift_point")
    @classmethod
    def _finite(cls, point: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(v) for v in point):
            raise ValueError(f"point {list(point)} is not finite")
        return point

    @field_validator("plan")
    @classmethod
    def _plan_fits_the_string_form(cls, plan: str | None) -> str | None:
        if plan is not None and PLAN_END in plan:
            raise ValueError(f"plan {plan!r} contains {PLAN_END!r}, which would end it early in the string form")
        return plan

    @model_validator(mode="after")
    def _consistent(self) -> Action:
        object.__setattr__(self, "decimals", self._canonical_decimals())
        if self.decimals is not None:  # canonical form: the coordinates the string form can carry
            for name in ("touch_point", "lift_point"):
                point = getattr(self, name)
                if point != NO_POINT:
                    object.__setattr__(self, name, tuple(round(v, self.decimals) for v in point))
        if self.action_type is ActionType.DUAL_POINT:
            for name in ("touch_point", "lift_point"):
                point = getattr(self, name)
                if not all(0.0 <= v <= 1.0 for v in point):
                    raise ValueError(f"{name} {list(point)} is outside [0, 1] (expected [y, x] normalised)")
        else:
            for name in ("touch_point", "lift_point"):
                if getattr(self, name) != NO_POINT:
                    raise ValueError(f"{name} must be [-1.0, -1.0] for {self.action_type.value}")
        if self.typed_text and self.action_type is not ActionType.TYPE:
            raise ValueError(f"typed_text must be empty for {self.action_type.value}")
        return self

    def _canonical_decimals(self) -> int | None:
        """The decimals the string form will show: fixed for non-point actions, else given or shared by all four numbers."""
        if self.action_type is not ActionType.DUAL_POINT:
            return DEFAULT_DECIMALS
        if self.decimals is not None:
            return self.decimals
        counts = {_repr_decimals(v) for v in (*self.touch_point, *self.lift_point)}
        only = counts.pop() if len(counts) == 1 else None
        return only if only is not None and only <= MAX_DECIMALS else None

    @classmethod
    def tap(cls, y: float, x: float, **kw: Any) -> Action:
        return cls(action_type=ActionType.DUAL_POINT, touch_point=(y, x), lift_point=(y, x), **kw)

    @classmethod
    def swipe(cls, touch: tuple[float, float], lift: tuple[float, float], **kw: Any) -> Action:
        return cls(action_type=ActionType.DUAL_POINT, touch_point=touch, lift_point=lift, **kw)

    @classmethod
    def type_text(cls, text: str, **kw: Any) -> Action:
        return cls(action_type=ActionType.TYPE, typed_text=text, **kw)

    @classmethod
    def simple(cls, action_type: ActionType | str, **kw: Any) -> Action:
        return cls(action_type=ActionType(action_type), **kw)

    @property
    def is_tap(self) -> bool:
        return self.action_type is ActionType.DUAL_POINT and self.swipe_distance <= SWIPE_DISTANCE_THRESHOLD

    @property
    def is_swipe(self) -> bool:
        return self.action_type is ActionType.DUAL_POINT and not self.is_tap

    @property
    def swipe_distance(self) -> float:
        (y0, x0), (y1, x1) = self.touch_point, self.lift_point
        return math.hypot(y1 - y0, x1 - x0)

    @property
    def kind(self) -> str:
        """Finer than action_type: tap / swipe / type / press_back / press_home / press_enter / complete."""
        if self.action_type is ActionType.DUAL_POINT:
            return "tap" if self.is_tap else "swipe"
        return {
            ActionType.TYPE: "type",
            ActionType.PRESS_BACK: "press_back",
            ActionType.PRESS_HOME: "press_home",
            ActionType.PRESS_ENTER: "press_enter",
            ActionType.STATUS_TASK_COMPLETE: "complete",
        }[self.action_type]

    def __str__(self) -> str:
        """The AutoUI string form, one line: ``format_action(parse_action(s)) == s`` (:mod:`digiq.actions`)."""
        decision = (
            f'"action_type": "{self.action_type.value}", '
            f'"touch_point": "[{_format_point(self.touch_point, self.decimals)}]", '
            f'"lift_point": "[{_format_point(self.lift_point, self.decimals)}]", '
            f'"typed_text": "{self.typed_text}"'
        )
        if self.plan is None:
            return decision
        return f"{PLAN_PREFIX}{self.plan}{PLAN_END}{decision}"


class Step(BaseModel):
    """One transition (s, a, r, s'), as stored in a dataset's step table.

    Screenshots are PNG files under the dataset folder, referenced by relative path and sha256.
    ``next_screenshot`` is None when no valid next frame exists (e.g. MiniWoB's black frame on
    termination is never stored as a real next state).
    """

    model_config = ConfigDict(extra="forbid")

    traj_id: str = Field(min_length=1)
    step_id: int = Field(ge=0)
    task: str = Field(min_length=1)
    seed: int | None = None
    goal: str
    observation: str
    screenshot: str
    screenshot_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    next_screenshot: str | None = None
    next_screenshot_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    elements: str | None = None  # JSON list of DOM/UI elements, when the env has them
    action: Action
    reward: float
    done: bool
    mc_return: float = 0.0  # discounted return from this step on; filled by the store at write time

    @field_validator("reward", "mc_return")
    @classmethod
    def _finite_reward(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return value


class Trajectory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    traj_id: str
    task: str
    goal: str
    steps: list[Step]

    @model_validator(mode="after")
    def _ordered(self) -> Trajectory:
        if not self.steps:
            raise ValueError(f"trajectory {self.traj_id} has no steps")
        for i, step in enumerate(self.steps):
            if step.traj_id != self.traj_id:
                raise ValueError(f"step {i} belongs to trajectory {step.traj_id}, not {self.traj_id}")
            if step.step_id != i:
                raise ValueError(f"step ids out of order: position {i} has step_id {step.step_id}")
            if step.done and i != len(self.steps) - 1:
                raise ValueError(f"step {i} is done but is not the last step")
        return self

    @property
    def success(self) -> bool:
        return any(step.reward > 0 for step in self.steps)

    @property
    def total_reward(self) -> float:
        return float(sum(step.reward for step in self.steps))


def _format_point(point: tuple[float, float], decimals: int | None) -> str:
    if point == NO_POINT:
        return NO_POINT_TEXT
    if decimals is None:  # shortest repr, trimmed as _repr_decimals counts (1.0 -> "1"): the parser then reads back None
        import numpy as np

        return ", ".join(np.format_float_positional(v, unique=True, trim="-") for v in point)
    return ", ".join(f"{v:.{decimals}f}" for v in point)


def _repr_decimals(value: float) -> int:
    """Decimals in the shortest exact positional rendering of ``value`` (0.5 -> 1, 1.0 -> 0)."""
    import numpy as np

    text = np.format_float_positional(value, unique=True, trim="-")
    return len(text.partition(".")[2])


def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """G_t = r_t + γ G_{t+1}, computed backwards."""
    returns, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns
