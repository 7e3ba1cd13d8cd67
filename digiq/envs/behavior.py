"""The behaviour policy π_β: stochastic, DOM-grounded, mediocre but sensible (AutoUI's role in Digi-Q).

For a state it builds a small menu of candidate actions from the goal text and the visible DOM
elements, scores each with a few generic heuristics, and samples from

    π_β(a | s) = (1 − noise) · softmax(score(a) / temperature) + noise · uniform(a)

Candidates: a tap on every visible clickable element (at a jittered point inside its box), a tap at a
random point of the page (off-target), typing each phrase of the goal (its quoted strings, else its
content words), PRESS_ENTER, a swipe up and down, and STATUS_TASK_COMPLETE.
Heuristics (no per-task rules): prefer elements whose text matches the goal; fill empty text fields
before pressing buttons (with ``fill_all`` above 0 also those still empty once every phrase is typed,
as a form that asks for one value twice needs); type only into a focused field, the phrase whose cue
word ("username") matches the field; don't uncheck a box the goal asks for; don't repeat the last tap.

The weights are named numbers (``Scores``); params.yaml's ``collect.behavior`` overrides some of them for
the collection, the candidate stage and live evaluation alike. The default data set
``submit_partial: 1.5`` (= ``submit_ready``): an *impatient* π_β that treats a partly filled form as
finished. Its most likely action is then wrong in some states (tap "Login" once the username is typed),
while its noise still proposes the right one: the systematic, state-dependent mistakes an offline
critic can correct and imitation copies. With ``submit_partial`` at ``submit_early`` (−2.5, the ``Scores``
default) π_β's most likely action already solves most default episodes, leaving a critic little to correct
(docs/results.md, "Settings and why": ``collect.behavior``).

``sample(view_or_step, k, rng)`` works offline on a stored step (goal + elements JSON + previous
actions from the observation text) and is what the candidate stage uses for K = 64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from digiq.envs.view import StepView
from digiq.errors import DigiqError
from digiq.schema import Action, ActionType, Step

FUNCTION_WORDS = frozenset("a an the and or of to in into on from with for by at is it its that then this as be".split())
# Generic UI-instruction vocabulary: never typed as a value when the goal has no quoted strings.
INSTRUCTION_WORDS = frozenset(
    "click select enter type press submit button buttons link links tab tabs field fields text list item items "
    "find switch between starts start ends end choose nothing all box boxes checkbox checkboxes".split()
)
TEXT_ENTRY_TAGS = frozenset({"input_text", "input_password", "input_email", "input_search", "input_tel", "input_url", "input_number", "textarea"})
TOGGLE_TAGS = frozenset({"input_checkbox", "input_radio"})
CONTROL_TAGS = TEXT_ENTRY_TAGS | TOGGLE_TAGS | {"select", "button", "input_submit", "input_button", "a"}
SUBMIT_TAGS = frozenset({"button", "input_submit", "input_button"})
MIN_AREA = 4.0 / (160 * 210)  # elements smaller than ~4 px² are not tap targets
TAP_JITTER = 0.3  # taps land within ±30 % of the element's size around its centre
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')
_TOKEN = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class Scores:
    """The heuristic weights (logits); every one is a plain, named number."""

    goal_match: float = 3.0  # × relevance (0–1) of a tapped element's text to the goal
    label_match: float = 1.0  # × relevance of a <label>'s text
    empty_field: float = 2.0  # tap an empty text field while goal phrases are still to be typed
    cue_match: float = 1.5  # the field's label/id is the goal word right before the phrase
    fill_all: float = 0.0  # tap an empty text field once every goal phrase is typed somewhere (0: leave it empty)
    refocus: float = -1.5  # tap the field that already has focus
    keep_checked: float = -4.0  # × relevance: unchecking a box the goal asks for
    uncheck_other: float = 0.5  # unchecking a box the goal does not mention
    submit_early: float = -2.5  # press a button while fields/boxes are still pending and nothing was done yet
    submit_partial: float = -2.5  # press a button while something is pending but the page was already worked on
    submit_ready: float = 1.5  # press a button once the page was worked on and nothing is pending
    repeat_tap: float = -1.5  # tap the element tapped by the previous action
    type_phrase: float = 2.5  # type a phrase into a focused empty field
    type_again: float = -2.0  # type a phrase the focused field already holds
    type_other: float = -0.5  # type into a focused field that holds something else
    type_unfocused: float = -2.0  # type with no text field focused
    enter_filled: float = 0.5  # press enter in a filled field
    enter_other: float = -2.0
    off_target: float = -0.5
    scroll: float = -2.5
    complete: float = -3.0


IMPATIENT = {"submit_partial": Scores.submit_ready}  # the default data's π_β (params: collect.behavior)


def scores_with(overrides: Mapping[str, float], field: str = "collect.behavior") -> Scores:
    """The default heuristic weights with some replaced, e.g. ``{"submit_partial": 1.5}``; unknown names are refused."""
    known = {f.name for f in fields(Scores)}
    for name, value in overrides.items():
        if name not in known:
            raise DigiqError(f"unknown heuristic weight {name!r} (known: {sorted(known)})", field=f"{field}.{name}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DigiqError(f"must be a finite number, got {value!r}", field=f"{field}.{name}")
    return replace(Scores(), **{name: float(value) for name, value in overrides.items()})


@dataclass(frozen=True)
class Candidate:
    kind: str  # tap | tap_random | type | enter | swipe_up | swipe_down | complete
    score: float
    bbox: tuple[float, float, float, float] | None = None  # tap target [y0, x0, y1, x1]
    text: str = ""


class BehaviorPolicy:
    """π_β. ``BehaviorPolicy(noise, seed).act(view)`` online; ``sample(step, k, rng)`` offline."""

    def __init__(self, noise: float = 0.3, seed: int = 0, temperature: float = 1.0,
                 scores: Scores | Mapping[str, float] | None = None):
        if not 0.0 <= noise <= 1.0:
            raise DigiqError(f"must be in [0, 1], got {noise}", field="noise")
        if temperature <= 0:
            raise DigiqError(f"must be positive, got {temperature}", field="temperature")
        self.noise = noise
        self.temperature = temperature
        self.scores = scores if isinstance(scores, Scores) else scores_with(scores or {})
        self.rng = np.random.default_rng(seed)

    # -- Policy protocol --------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, view: StepView) -> Action:
        return self.sample(view, 1, self.rng)[0]

    # -- offline ------------------------------------------------------------------------------
    def sample(self, step: StepView | Step, k: int, rng: np.random.Generator) -> list[Action]:
        """k independent draws from π_β(· | step)."""
        view = step if isinstance(step, StepView) else StepView.from_step(step)
        candidates = self.candidates(view)
        probs = self.probabilities(candidates)
        picks = rng.choice(len(candidates), size=k, p=probs)
        jitter = rng.uniform(-TAP_JITTER, TAP_JITTER, size=(k, 2))
        anywhere = rng.uniform(0.0, 1.0, size=(k, 2))
        return [_to_action(candidates[i], jitter[n], anywhere[n]) for n, i in enumerate(picks)]

    def probabilities(self, candidates: list[Candidate]) -> np.ndarray:
        logits = np.array([c.score for c in candidates]) / self.temperature
        softmax = np.exp(logits - logits.max())
        softmax /= softmax.sum()
        return (1.0 - self.noise) * softmax + self.noise / len(candidates)

    def candidates(self, view: StepView) -> list[Candidate]:
        return _Reader(view, self.scores).candidates()


class _Reader:
    """Reads one state: the goal's phrases, the page's controls, what is still pending."""

    def __init__(self, view: StepView, scores: Scores):
        self.w = scores
        self.goal = view.goal
        self.phrases = goal_phrases(view.goal)
        self.goal_tokens = {_stem(t) for t in _tokens(view.goal)} - FUNCTION_WORDS
        self.elements = view.elements
        self.by_ref = {e["ref"]: e for e in view.elements}
        self.children: dict[int, list[dict[str, Any]]] = {}
        for e in view.elements:
            self.children.setdefault(e["parent"], []).append(e)
        self.last = view.previous_actions[-1] if view.previous_actions else None
        self.focused = next((e for e in view.elements if e.get("focused") and _is_entry(e)), None)
        self.typed = {str(e.get("value") or "") for e in view.elements if e["tag"] in TEXT_ENTRY_TAGS} - {""}
        self.untyped = [p for p in self.phrases if not any(p in value for value in self.typed)]

    def candidates(self) -> list[Candidate]:
        out = [self._tap(e) for e in self.elements if _tappable(e)]
        out.append(Candidate("tap_random", self.w.off_target))
        out.extend(self._type(p) for p in self.phrases)
        out.append(Candidate("enter", self.w.enter_filled if self.focused is not None and self.focused.get("value") else self.w.enter_other))
        out.append(Candidate("swipe_up", self.w.scroll))
        out.append(Candidate("swipe_down", self.w.scroll))
        out.append(Candidate("complete", self.w.complete))
        return out

    # -- taps ---------------------------------------------------------------------------------
    def _tap(self, e: dict[str, Any]) -> Candidate:
        w, tag = self.w, e["tag"]
        relevance = self.relevance(self.label(e))
        score = 0.0
        if _is_entry(e):  # fields are chosen by emptiness and cue words, not by their label's text
            if e.get("focused"):
                score += w.refocus
            elif self._empty(e) and self.untyped and not self._focused_empty():
                score += w.empty_field + w.cue_match * self._cue(e)
            elif self._empty(e) and self.phrases and not self._focused_empty() and e["tag"] in TEXT_ENTRY_TAGS:
                score += w.fill_all  # every phrase is in some field: a form that repeats one ("both fields")
        elif tag == "label":  # a label names a field; it is rarely the target itself
            score += w.label_match * relevance
        else:
            score += w.goal_match * relevance
        if tag in TOGGLE_TAGS and e.get("value") is True:
            score += w.keep_checked * relevance if relevance > 0.5 else w.uncheck_other
        if tag in SUBMIT_TAGS:
            score += self._submit_score()
        if self.last is not None and self.last.kind == "tap" and _inside(self.last.touch_point, e["bbox"]):
            score += w.repeat_tap
        return Candidate("tap", score, bbox=tuple(e["bbox"]))

    def label(self, e: dict[str, Any]) -> str:
        """An element's own text, or for a checkbox/radio/field the text of its label (siblings)."""
        if e["tag"] in TOGGLE_TAGS or _is_entry(e):
            siblings = self.children.get(e["parent"], [])
            return " ".join(s["text"] for s in siblings if s is not e and s.get("text"))
        return e.get("text") or ""

    def relevance(self, text: str) -> float:
        """How well a piece of page text matches the goal: 1 exact phrase, 0.6 contains, else token overlap."""
        norm = text.strip().lower()
        if not norm:
            return 0.0
        phrases = [p.lower() for p in self.phrases]
        if norm in phrases:
            return 1.0
        if any(len(p) >= 2 and (p in norm or norm in p) for p in phrases):
            return 0.6 + 0.2 * sum(p in norm for p in phrases if len(p) >= 2) / max(len(phrases), 1)
        tokens = {_stem(t) for t in _tokens(norm)} - FUNCTION_WORDS
        if not tokens:
            return 0.0
        return 0.8 * len(tokens & self.goal_tokens) / len(tokens)

    def pending(self) -> int:
        """Fields and boxes the goal still asks for (a sensible agent fills them before submitting)."""
        empty_fields = sum(1 for e in self.elements if _is_entry(e) and self._empty(e)) if self.untyped else 0
        unchecked = sum(
            1 for e in self.elements if e["tag"] in TOGGLE_TAGS and e.get("value") is False and self.relevance(self.label(e)) > 0.5
        )
        return empty_fields + unchecked

    def _submit_score(self) -> float:
        worked = self._worked()
        if self.pending() == 0:
            return self.w.submit_ready * worked
        return self.w.submit_partial if worked else self.w.submit_early

    def _cue(self, e: dict[str, Any]) -> float:
        """1 when the goal word right before one of the untyped phrases names this field."""
        names = {_stem(t) for t in _tokens(f"{e.get('id', '')} {self.label(e)}")}
        return float(any(_cue_word(self.goal, p) in names for p in self.untyped))

    def _focused_empty(self) -> bool:
        return self.focused is not None and self._empty(self.focused)

    def _worked(self) -> float:
        """1 once something on the page was filled in or ticked (then a button may finish the task)."""
        return float(bool(self.typed) or any(e["tag"] in TOGGLE_TAGS | {"select"} and e.get("tampered") for e in self.elements))

    def _empty(self, e: dict[str, Any]) -> bool:
        """A text field without a value; a list we did not just type into (its choice is not in the DOM)."""
        if e["tag"] == "select":
            return not (e.get("focused") and self.last is not None and self.last.kind == "type")
        return not e.get("value")

    # -- typing -------------------------------------------------------------------------------
    def _type(self, phrase: str) -> Candidate:
        w, field = self.w, self.focused
        if field is None:
            return Candidate("type", w.type_unfocused, text=phrase)
        value = str(field.get("value") or "")
        if phrase in value or (field["tag"] == "select" and self.last is not None and self.last.kind == "type"):
            return Candidate("type", w.type_again, text=phrase)
        if value:
            return Candidate("type", w.type_other, text=phrase)
        cue = float(_cue_word(self.goal, phrase) in {_stem(t) for t in _tokens(f"{field.get('id', '')} {self.label(field)}")})
        return Candidate("type", w.type_phrase + w.cue_match * cue, text=phrase)


def goal_phrases(goal: str) -> list[str]:
    """What a goal asks to type or find: its quoted strings, else its content words (in order, unique)."""
    quoted = [(a or b).strip() for a, b in _QUOTED.findall(goal)]
    phrases = [q for q in quoted if q]
    if not phrases:
        phrases = [t for t in _TOKEN.findall(goal) if t.lower() not in FUNCTION_WORDS | INSTRUCTION_WORDS]
    return list(dict.fromkeys(phrases))


def _cue_word(goal: str, phrase: str) -> str:
    """The (stemmed, lower-case) word right before a phrase in the goal, e.g. 'username' for "vina"."""
    index = goal.find(phrase)
    words = _tokens(goal[:index]) if index > 0 else []
    return _stem(words[-1]) if words else ""


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _stem(token: str) -> str:
    return token[:-1] if len(token) > 3 and token.endswith("s") else token


def _is_entry(e: dict[str, Any]) -> bool:
    return e["tag"] in TEXT_ENTRY_TAGS or e["tag"] == "select"


def _tappable(e: dict[str, Any]) -> bool:
    y0, x0, y1, x1 = e["bbox"]
    if (y1 - y0) * (x1 - x0) < MIN_AREA:
        return False
    return e["tag"] in CONTROL_TAGS or (e.get("leaf") and e["tag"] != "body")


def _inside(point: tuple[float, float], bbox: list[float]) -> bool:
    y, x = point
    return bbox[0] <= y <= bbox[2] and bbox[1] <= x <= bbox[3]


def tapped_element(point: tuple[float, float], elements: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The innermost (smallest) tappable element under ``point``, None when the point hits no control."""
    hits = [e for e in elements if _tappable(e) and _inside(point, e["bbox"])]
    return min(hits, key=lambda e: (e["bbox"][2] - e["bbox"][0]) * (e["bbox"][3] - e["bbox"][1]), default=None)


def _shortened(text: Any, limit: int = 40) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters with an ellipsis."""
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def element_name(element: dict[str, Any]) -> str:
    """Its text, else its tag and id (inputs have no text)."""
    if text := _shortened(element.get("text")):
        return text
    ident = element.get("id") or ""
    return f"{element.get('tag', '?')}#{ident}" if ident else str(element.get("tag", "?"))


def tap_target(action: Action, elements: list[dict[str, Any]] | None) -> str | None:
    """The name of the control under a tap (:func:`element_name`); None for other actions, off every control or
    without elements."""
    if action.kind != "tap" or not elements:
        return None
    hit = tapped_element(action.touch_point, elements)
    return element_name(hit) if hit is not None else None


def field_values(elements: list[dict[str, Any]] | None) -> str | None:
    """What the page's text fields hold, as one line of state text (``Text fields: input_text#tt holds "Karrie",
    input_password#password is empty.``); None when the page has no text field."""
    text_fields = [e for e in elements or () if e.get("tag") in TEXT_ENTRY_TAGS]
    if not text_fields:
        return None
    return "Text fields: " + ", ".join(_field_state(e) for e in text_fields) + "."


def _field_state(element: dict[str, Any]) -> str:
    value = _shortened(element.get("value"))
    return f'{element_name(element)} holds "{value}"' if value else f"{element_name(element)} is empty"


def _to_action(c: Candidate, jitter: np.ndarray, anywhere: np.ndarray) -> Action:
    if c.kind == "tap":
        y0, x0, y1, x1 = c.bbox  # type: ignore[misc]
        y = (y0 + y1) / 2 + jitter[0] * (y1 - y0)
        x = (x0 + x1) / 2 + jitter[1] * (x1 - x0)
        return Action.tap(_clip(y), _clip(x))
    if c.kind == "tap_random":
        return Action.tap(float(anywhere[0]), float(anywhere[1]))
    if c.kind == "type":
        return Action.type_text(c.text)
    if c.kind == "enter":
        return Action.simple(ActionType.PRESS_ENTER)
    if c.kind in ("swipe_up", "swipe_down"):  # a finger moving up scrolls the page down
        start, end = (0.7, 0.3) if c.kind == "swipe_up" else (0.3, 0.7)
        return Action.swipe((start, 0.5), (end, 0.5))
    return Action.simple(ActionType.STATUS_TASK_COMPLETE)


def _clip(v: float) -> float:
    return float(min(max(v, 0.0), 1.0)) if math.isfinite(v) else 0.5
