"""The official critic's input channels (VLMDoubleCritic in DigiRL-agent/digiq), and how they compose.

A channel is one block of a head's input vector; the heads read the concatenation in the canonical order
``vlm, image, goal, prev_action, action``:

    x_Q(s, a) = f(s, a) ⊕ v(s) ⊕ v(s_prev) ⊕ e(goal) ⊕ e(prev type) ⊕ e(prev text) ⊕ e(type) ⊕ e(text)
    x_V(s)    =          v(s) ⊕ v(s_prev) ⊕ e(goal) ⊕ e(prev type) ⊕ e(prev text)

with f the VLM features of the embed stage (f(s) in V, f(s, a) in Q), v the frozen vision tower's pooled image
feature (zeros for the screenshot before step 0), and e a frozen sentence encoder (all-MiniLM-L6-v2: mean-pooled
BERT token states, L2-normalised). The previous action is the dataset action of step t−1 (empty strings at step 0).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

ORDER = ("vlm", "image", "goal", "prev_action", "action")

CHANNELS: dict[str, str] = {
    "vlm": "the VLM feature: f(s, a) [d_sa] in Q, f(s) [d_s] in V (today's critic reads this alone)",
    "image": "v(s) ⊕ v(s_prev) [2·d_v]: the frozen vision tower's pooled feature of this and the previous screenshot (zeros at step 0)",
    "goal": "e(goal) [d_e]: the sentence embedding of the task's instruction",
    "prev_action": "e(prev type) ⊕ e(prev text) [2·d_e]: the previous step's action (empty strings at step 0)",
    "action": "e(type) ⊕ e(text) [2·d_e]: the candidate action's kind in words and its text (typed text, or the tapped control's name); Q only",
}


def _canonical(names: list[str], head: str) -> list[str]:
    unknown = [name for name in names if name not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown channel(s) {unknown} in {head}; known: {list(ORDER)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"channel(s) {repeated} listed twice in {head}")
    if not names:
        raise ValueError(f"{head} needs at least one channel")
    return [name for name in ORDER if name in names]


class Inputs(BaseModel):
    """Which channels feed Q and V (kept in canonical order whatever order they are listed in)."""

    model_config = ConfigDict(extra="forbid")

    q: list[str] = Field(default_factory=lambda: list(ORDER), description="channels of Q's input x_Q, from vlm, image, goal, prev_action, action")
    v: list[str] = Field(default_factory=lambda: ["image", "goal", "prev_action"], description="channels of V's input x_V, from vlm, image, goal, prev_action (action is Q only)")

    @field_validator("q")
    @classmethod
    def _q(cls, names: list[str]) -> list[str]:
        return _canonical(names, "q")

    @field_validator("v")
    @classmethod
    def _v(cls, names: list[str]) -> list[str]:
        if "action" in names:
            raise ValueError("'action' is a Q channel: V(s) does not see the action")
        return _canonical(names, "v")

    @property
    def vlm_only(self) -> bool:
        """Today's critic: f(s, a) in Q and f(s) in V, nothing else."""
        return self.q == ["vlm"] and self.v == ["vlm"]
