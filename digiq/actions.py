"""Parse and format the AutoUI action string form used by AutoUI, DigiRL and Digi-Q.

    Action Plan: [DUAL_POINT,TYPE] ; Action Decision: "action_type": "DUAL_POINT",
    "touch_point": "[0.5200, 0.3100]", "lift_point": "[0.5200, 0.3100]", "typed_text": ""

(one line in the data). ``format_action(parse_action(s)) == s`` for every string the official data
writes; ``parse_action(format_action(a)) == a`` for every Action.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from digiq.errors import ActionParseError
from digiq.schema import MAX_DECIMALS, NO_POINT, NO_POINT_TEXT, PLAN_END, PLAN_PREFIX, Action, ActionType

DECISION_SEPARATOR = PLAN_END  # "] ; Action Decision: "
DECISION_PREFIX = "Action Decision: "
_DECISION = re.compile(
    r'"action_type": "(?P<action_type>[^"]*)", '
    r'"touch_point": "\[(?P<touch_point>[^\]"]*)\]", '
    r'"lift_point": "\[(?P<lift_point>[^\]"]*)\]", '
    r'"typed_text": "(?P<typed_text>.*)"',
    re.DOTALL,
)
# A coordinate as the official code writes it: ASCII digits, no leading zeros, no sign but "-", nothing around
# it (a looser pattern read "0.5\n", "00.5" or Arabic-Indic digits, which do not format back to themselves).
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.([0-9]+))?")


def parse_action(text: str) -> Action:
    """Parse an AutoUI action string (with or without its ``Action Plan: [...] ;`` part)."""
    if not isinstance(text, str):
        raise ActionParseError(f"expected an action string, got {type(text).__name__}")
    plan, decision = _split_plan(text)
    match = _DECISION.fullmatch(decision)
    if match is None:
        raise ActionParseError(f"malformed action decision {_quote(decision)}; expected {_decision_template()}")
    action_type = _parse_action_type(match["action_type"])
    touch, touch_decimals = _parse_point(match["touch_point"], "touch_point")
    lift, lift_decimals = _parse_point(match["lift_point"], "lift_point")
    decimals = _common_decimals(touch_decimals + lift_decimals) if action_type is ActionType.DUAL_POINT else 4
    try:
        return Action(
            action_type=action_type,
            touch_point=touch,
            lift_point=lift,
            typed_text=match["typed_text"],
            plan=plan,
            decimals=decimals,
        )
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise ActionParseError(f"invalid action {_quote(decision)}: {problem['msg'].removeprefix('Value error, ')}") from None


def format_action(action: Action) -> str:
    """The AutoUI string form of ``action`` (:meth:`digiq.schema.Action.__str__`, where the data contract keeps it)."""
    return str(action)


def describe_action(action: Action, target: str | None = None) -> str:
    """A short human-readable rendering for prompts and viewers, e.g. ``tap (y=0.52, x=0.31) on "Submit"``."""
    kind = action.kind
    if kind == "tap":
        y, x = action.touch_point
        text = f"tap (y={y:.2f}, x={x:.2f})"
        return f'{text} on "{target}"' if target else text
    if kind == "swipe":
        return f"swipe {_swipe_direction(action)} from (y={action.touch_point[0]:.2f}, x={action.touch_point[1]:.2f})"
    if kind == "type":
        return f'type "{action.typed_text}"'
    return {
        "press_back": "press back",
        "press_home": "press home",
        "press_enter": "press enter",
        "complete": "task complete",
    }[kind]


def _swipe_direction(action: Action) -> str:
    dy = action.lift_point[0] - action.touch_point[0]
    dx = action.lift_point[1] - action.touch_point[1]
    if abs(dy) >= abs(dx):
        return "up" if dy < 0 else "down"
    return "left" if dx < 0 else "right"


def _split_plan(text: str) -> tuple[str | None, str]:
    if text.startswith(PLAN_PREFIX):
        plan, separator, decision = text[len(PLAN_PREFIX) :].partition(DECISION_SEPARATOR)
        if not separator:
            raise ActionParseError(
                f"action string {_quote(text)} has an Action Plan but no '{DECISION_SEPARATOR.strip()}' part"
            )
        return plan, decision
    if text.startswith(DECISION_PREFIX):
        raise ActionParseError(f"action string {_quote(text)} has an Action Decision but no Action Plan before it")
    return None, text


def _parse_action_type(name: str) -> ActionType:
    try:
        return ActionType(name)
    except ValueError:
        known = ", ".join(t.value for t in ActionType)
        raise ActionParseError(f'unknown action_type "{name}" (expected one of {known})') from None


def _parse_point(text: str, field: str) -> tuple[tuple[float, float], list[int]]:
    if text == NO_POINT_TEXT:
        return NO_POINT, []
    parts = text.split(", ")
    matches = [_NUMBER.fullmatch(part) for part in parts]
    if len(parts) != 2 or not all(matches):
        raise ActionParseError(f'{field} "[{text}]" is not two numbers "[y, x]"')
    point = (float(parts[0]), float(parts[1]))
    if point == NO_POINT:  # one spelling per action: "[-1.00, -1]" would format back as "[-1.0, -1.0]"
        raise ActionParseError(f'{field} "[{text}]" is the no-point value: write it as "[{NO_POINT_TEXT}]"')
    decimals = [len(m.group(1)) if m.group(1) is not None else 0 for m in matches if m]
    return point, decimals


def _common_decimals(decimals: list[int]) -> int | None:
    shared = decimals[0] if decimals and all(d == decimals[0] for d in decimals) else None
    return shared if shared is not None and shared <= MAX_DECIMALS else None


def _quote(text: str, limit: int = 160) -> str:
    shown = text if len(text) <= limit else text[:limit] + "…"
    return repr(shown)


def _decision_template() -> str:
    return '"action_type": "...", "touch_point": "[y, x]", "lift_point": "[y, x]", "typed_text": "..."'
