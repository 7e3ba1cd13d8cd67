"""Prompts for the visual-change question, one variant per action type, in the Digi-Q style.

A prompt is one string in the LLaVA-1.5 conversation form::

    USER: <image>
    Previous Actions: ... Goal: ...
    Action: tap (y=0.52, x=0.31) on "Submit" (the spot: <tap>). Will tapping there change the screen? Answer Yes or No. ASSISTANT:

- ``<image>`` (:data:`IMAGE`) stands for the screenshot; the VLM expands it to its image tokens.
- ``<tap>`` (:data:`TAP_SLOT`) is the tap placeholder: the VLM replaces its embedding by the projected patch
  token under the touch point (a swipe has two slots: touch, then lift). This puts the action's location into
  the input without drawing a marker and re-encoding the screenshot for each candidate. ``marker="none"``
  or ``"draw"`` leave the slot out (``"draw"``: the caller draws :func:`~digiq.vlm.inputs.draw_tap_marker`
  on the screenshot instead).
- Everything before "Action:" depends on the state only, so all candidates of a state share that prefix
  (the VLM computes it once).
- The prompt order (:data:`PROMPT_ORDERS`) puts the screenshot before the state text (``image_first``, LLaVA's
  and the official form, above) or after it (``state_first``: ``USER: <state text>\n<image>\n<action>``). A
  checkpoint records its order in its config (:data:`ORDER_KEY`), so that it is always read the way it was
  built and fine-tuned; a checkpoint without the key is ``image_first``.
- A checkpoint may also read the page's DOM where the paper's VLM reads the screenshot (our vision tower cannot
  read): :class:`PageReading`, recorded in its config like the order.
- The answer the model is asked for is the next token after "ASSISTANT:": :data:`ANSWERS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from digiq.actions import describe_action
from digiq.errors import DigiqError

if TYPE_CHECKING:
    from digiq.schema import Action

Marker = Literal["patch", "draw", "none"]
PromptOrder = Literal["image_first", "state_first"]
MARKERS: tuple[str, ...] = ("patch", "draw", "none")

IMAGE = "<image>"
TAP_SLOT = "<tap>"
ANSWERS = ("Yes", "No")
TEMPLATES: dict[str, str] = {
    "image_first": "USER: {image}\n{state}\n{action} ASSISTANT:",
    "state_first": "USER: {state}\n{image}\n{action} ASSISTANT:",
}
PROMPT_ORDERS: tuple[str, ...] = tuple(TEMPLATES)
ORDER_KEY = "digiq_prompt_order"  # the config.json attribute naming a checkpoint's prompt order
TARGET_KEY = "digiq_tap_target"  # config.json: true when tap prompts name the element under the tap
FIELDS_KEY = "digiq_field_values"  # config.json: true when the state text says what the page's text fields hold
UNRECORDED_ORDER: PromptOrder = "image_first"  # the order of a checkpoint without ORDER_KEY (LLaVA's own)

QUESTIONS = {
    "tap": "Will tapping there change the screen? Answer Yes or No.",
    "swipe": "Will this swipe scroll or change the screen? Answer Yes or No.",
    "type": "Will typing this text change the screen? Answer Yes or No.",
    "press_enter": "Will pressing Enter change the screen? Answer Yes or No.",
    "complete": "Will declaring the task complete change the screen? Answer Yes or No.",
    "press_back": "Will this action change the screen? Answer Yes or No.",
    "press_home": "Will this action change the screen? Answer Yes or No.",
}
_EOS_MARKS = ("</s>", "<|endoftext|>", "[SEP]")


def state_text(goal: str, observation: str = "") -> str:
    """The state part: the observation text (previous actions; the official form already names the goal),
    with a ``Goal:`` line added when the observation does not contain the goal."""
    text = observation.strip()
    for mark in _EOS_MARKS:
        text = text.replace(mark, "")
    text = text.strip()
    goal = goal.strip()
    if goal and goal not in text:
        text = f"{text}\nGoal: {goal}" if text else f"Goal: {goal}"
    return text


def action_text(action: Action, target: str | None = None, marker: Marker = "patch") -> str:
    """The action part: what the action is, where (tap slots with ``marker="patch"``), and the question."""
    kind = action.kind
    text = f"Action: {describe_action(action, target)}"
    if marker == "patch" and kind == "tap":
        text += f" (the spot: {TAP_SLOT})"
    elif marker == "patch" and kind == "swipe":
        text += f" (from {TAP_SLOT} to {TAP_SLOT})"
    return f"{text}. {QUESTIONS[kind]}"


@dataclass(frozen=True)
class PageReading:
    """What a checkpoint's prompts read off the page's DOM elements, standing in for reading the screenshot:

    - ``tap_target`` (:data:`TARGET_KEY`): a tap's action text names the control under it, ``tap (…) on "Submit"``;
    - ``field_values`` (:data:`FIELDS_KEY`): the state text ends with what the text fields hold,
      ``Text fields: input_text#tt holds "Karrie".`` At ``collect.history: 1`` the previous-action text alone does
      not tell "typed, then tapped the field again" from "tapped the field" (docs/results.md).

    The build records both in config.json; finetune, embed and evaluate follow them."""

    tap_target: bool = False
    field_values: bool = False

    @classmethod
    def of_config(cls, config: Any) -> PageReading:
        """The reading a checkpoint's config (a transformers config or its config.json dict) records."""
        get = config.get if isinstance(config, dict) else (lambda key, default: getattr(config, key, default))
        return cls(tap_target=bool(get(TARGET_KEY, False)), field_values=bool(get(FIELDS_KEY, False)))

    def config_keys(self) -> dict[str, bool]:
        """The config.json entries that record this reading (none for the default, which reads nothing)."""
        return {**({TARGET_KEY: True} if self.tap_target else {}), **({FIELDS_KEY: True} if self.field_values else {})}

    @property
    def reads_elements(self) -> bool:
        return self.tap_target or self.field_values

    def target(self, action: Action, elements: list[dict[str, Any]] | None) -> str | None:
        """What the action's prompt names as its target (None when taps are not named)."""
        from digiq.envs.behavior import tap_target

        return tap_target(action, elements) if self.tap_target else None

    def targets(self, actions: Sequence[Action], elements: list[dict[str, Any]] | None) -> list[str | None] | None:
        return [self.target(a, elements) for a in actions] if self.tap_target else None

    def observation(self, observation: str, elements: list[dict[str, Any]] | None) -> str:
        """The observation text the state part is built from: with the text fields' contents when asked."""
        from digiq.envs.behavior import field_values

        line = field_values(elements) if self.field_values else None
        return f"{observation}\n{line}" if line else observation


def unknown_order(order: str) -> str:
    """The message for a prompt order that is not one of :data:`PROMPT_ORDERS`."""
    return f"unknown prompt order {order!r} (expected one of {', '.join(PROMPT_ORDERS)})"


def checked_order(order: str, *, file: str | Path | None = None, field: str = ORDER_KEY) -> PromptOrder:
    """``order`` itself when it is one of :data:`PROMPT_ORDERS`; otherwise a DigiqError naming ``file`` and ``field``."""
    if order not in PROMPT_ORDERS:
        raise DigiqError(unknown_order(order), file=file, field=field)
    return order  # type: ignore[return-value]


def template(order: PromptOrder) -> str:
    """The conversation template of a prompt order."""
    if order not in TEMPLATES:
        raise ValueError(unknown_order(order))
    return TEMPLATES[order]


def build_prompt(goal: str, observation: str, action: Action, target: str | None = None,
                 marker: Marker = "patch", order: PromptOrder = "image_first") -> str:
    """The full prompt for one (state, action) pair."""
    if marker not in MARKERS:
        raise ValueError(f"unknown marker {marker!r} (expected one of {', '.join(MARKERS)})")
    return template(order).format(image=IMAGE, state=state_text(goal, observation),
                                  action=action_text(action, target, marker))


def build_prompts(goal: str, observation: str, actions: Sequence[Action],
                  targets: Sequence[str | None] | None = None, marker: Marker = "patch",
                  order: PromptOrder = "image_first") -> list[str]:
    """Prompts for the candidates of one state (they share the state prefix)."""
    targets = list(targets) if targets is not None else [None] * len(actions)
    if len(targets) != len(actions):
        raise ValueError(f"{len(actions)} actions but {len(targets)} targets")
    return [build_prompt(goal, observation, a, t, marker, order) for a, t in zip(actions, targets, strict=True)]


def state_prompt(goal: str, observation: str, order: PromptOrder = "image_first") -> str:
    """A prompt for the state alone (f(s)): the image and the state text, no action."""
    return template(order).format(image=IMAGE, state=state_text(goal, observation),
                                  action="What will the next action be?")
