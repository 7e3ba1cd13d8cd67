"""A MiniWoB page in the agent's terms: AitW actions → MiniWoB actions in pixels, DOM elements → boxes in [0, 1].

Action mapping: tap → CLICK_COORDS (normalised [y, x] → pixels of the page, clipped into it);
swipe → SCROLL_UP/DOWN_COORDS at the touch point (a finger moving up scrolls the page down);
TYPE → TYPE_TEXT; PRESS_ENTER → PRESS_KEY "<Enter>"; STATUS_TASK_COMPLETE ends the episode without
touching the page; PRESS_BACK / PRESS_HOME have no meaning on a web page and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from digiq.errors import DigiqError
from digiq.schema import Action

ENTER_KEY = "<Enter>"
MAX_TYPED_CHARS = 64  # miniwob's TYPING_MAX_LENGTH


@dataclass(frozen=True)
class EnvAction:
    """A MiniWoB action in miniwob's own terms (what ``env.step`` receives), or the end of the episode."""

    kind: str  # NONE | CLICK_COORDS | SCROLL_UP_COORDS | SCROLL_DOWN_COORDS | TYPE_TEXT | PRESS_KEY | COMPLETE
    left: float = 0.0
    top: float = 0.0
    text: str = ""
    key: str = ""


def to_env_action(action: Action, width: float, height: float) -> EnvAction:
    """Map an AitW action onto a MiniWoB action on a ``width``×``height`` page."""
    kind = action.kind
    if kind in ("tap", "swipe"):
        left, top = to_pixels(action.touch_point, width, height)
        if kind == "tap":
            return EnvAction("CLICK_COORDS", left, top)
        dy = action.lift_point[0] - action.touch_point[0]
        dx = action.lift_point[1] - action.touch_point[1]
        if abs(dx) > abs(dy):  # MiniWoB's wheel only scrolls vertically
            return EnvAction("NONE")
        return EnvAction("SCROLL_DOWN_COORDS" if dy < 0 else "SCROLL_UP_COORDS", left, top)
    if kind == "type":
        return EnvAction("TYPE_TEXT", text=action.typed_text[:MAX_TYPED_CHARS])
    if kind == "press_enter":
        return EnvAction("PRESS_KEY", key=ENTER_KEY)
    if kind == "complete":
        return EnvAction("COMPLETE")
    raise DigiqError(
        f"{action.action_type.value} has no meaning on a MiniWoB web page (there is no back or home button); "
        "use taps, swipes, TYPE, PRESS_ENTER or STATUS_TASK_COMPLETE",
        field="action_type",
    )


def to_pixels(point: tuple[float, float], width: float, height: float) -> tuple[float, float]:
    """Normalised [y, x] → (left, top) pixels, clipped into the page (half a pixel inside its border)."""
    y, x = point
    left = min(max(x * width, 0.5), width - 0.5)
    top = min(max(y * height, 0.5), height - 0.5)
    return left, top


def to_normalised(left: float, top: float, width: float, height: float) -> tuple[float, float]:
    """(left, top) pixels → normalised [y, x]."""
    return top / height, left / width


def dom_elements(root: Any, width: float, height: float) -> list[dict[str, Any]]:
    """The DOM elements that intersect the page, as JSON-ready dicts.

    ``bbox`` is ``[y0, x0, y1, x1]`` normalised to the page (clipped to [0, 1]); ``value`` is the
    text of an input or the checked state (bool) of a checkbox/radio; ``tampered`` marks elements
    clicked or typed into during this episode; ``leaf`` marks elements with their own text
    (MiniWoB's clickable leaves); text fragments have tag ``t`` and negative refs.
    """
    out = []
    for el in root.subtree_elements:
        y0, x0, y1, x1 = el.top, el.left, el.top + el.height, el.left + el.width
        if y1 <= 0 or x1 <= 0 or y0 >= height or x0 >= width:
            continue
        bbox = [
            round(min(max(y0 / height, 0.0), 1.0), 4),
            round(min(max(x0 / width, 0.0), 1.0), 4),
            round(min(max(y1 / height, 0.0), 1.0), 4),
            round(min(max(x1 / width, 0.0), 1.0), 4),
        ]
        out.append(
            {
                "ref": int(el.ref),
                "parent": int(el.parent.ref) if el.parent is not None else 0,
                "tag": el.tag,
                "text": el.text or "",
                "value": el.value if isinstance(el.value, (bool, str)) else None,
                "id": el.id or "",
                "classes": el.classes if isinstance(el.classes, str) else "",
                "bbox": bbox,
                "focused": bool(el.focused),
                "tampered": bool(el.tampered),
                "leaf": bool(el.is_leaf),
            }
        )
    return out
