"""ReplayingEnv: which resets and steps reach the browser, where it stands, and what happens when a page does not
repeat. The page here is a small scripted model (a counter of the taps so far, with a screenshot made from it), so
that every call the browser gets can be counted; the real-browser check that results do not change is
tests/test_evaluate.py::test_methods_share_what_their_episodes_have_in_common_and_get_the_same_episodes."""

from __future__ import annotations

import numpy as np
import pytest

from digiq.envs.miniwob import Observation, StepResult
from digiq.envs.replay import ReplayingEnv, same_page
from digiq.errors import DigiqError
from digiq.schema import Action, ActionType


def tap(x: float) -> Action:
    return Action(action_type=ActionType.DUAL_POINT, touch_point=(0.5, x), lift_point=(0.5, x))


DONE = tap(0.9)  # the tap that ends an episode


class ScriptedPage:
    """A page whose screenshot encodes (seed, taps so far); ``drift`` changes what a reset shows from then on."""

    task = "scripted"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.taps: list[float] = []
        self.seed = 0
        self.drift = 0

    def _obs(self) -> Observation:
        shot = np.full((2, 2, 3), (self.seed + len(self.taps) + self.drift) % 256, dtype=np.uint8)
        return Observation(goal=f"goal {self.seed}", screenshot=shot, elements=[{"taps": list(self.taps)}])

    def reset(self, seed: int) -> Observation:
        self.calls.append(f"reset {seed}")
        self.seed, self.taps = seed, []
        return self._obs()

    def step(self, action: Action) -> StepResult:
        self.calls.append(f"step {action.touch_point[1]}")
        self.taps.append(action.touch_point[1])
        if action == DONE:
            return StepResult(None, 1.0, True)
        return StepResult(self._obs(), 0.0, False)


def play(env: ReplayingEnv, seed: int, actions: list[Action]) -> list[Observation | StepResult]:
    return [env.reset(seed), *(env.step(a) for a in actions)]


def test_a_second_policy_on_the_same_path_reaches_no_browser():
    page, env = ScriptedPage(), ReplayingEnv()
    env.attach(page)
    first = play(env, 7, [tap(0.1), tap(0.2), DONE])
    calls = list(page.calls)
    again = play(env, 7, [tap(0.1), tap(0.2), DONE])
    assert again == first and page.calls == calls
    assert env.counts.as_dict() == {"browser": 4, "reused": 4, "replayed": 0}


def test_a_divergence_replays_the_shared_prefix_and_checks_it():
    page, env = ScriptedPage(), ReplayingEnv()
    env.attach(page)
    play(env, 7, [tap(0.1), tap(0.2), DONE])  # the page has ended: the browser stands nowhere
    page.calls.clear()
    branch = play(env, 7, [tap(0.1), tap(0.3)])
    assert page.calls == ["reset 7", "step 0.1", "step 0.3"]  # replayed to after tap(0.1), then the new step
    assert env.counts.as_dict() == {"browser": 5, "reused": 2, "replayed": 2}
    assert branch[-1].observation.elements == [{"taps": [0.1, 0.3]}]
    page.calls.clear()
    play(env, 7, [tap(0.1), tap(0.3), tap(0.4)])  # the browser already stands after (0.1, 0.3): one step, no replay
    assert page.calls == ["step 0.4"]


def test_another_seed_starts_a_new_tree_and_reuse_off_plays_everything():
    page, env = ScriptedPage(), ReplayingEnv()
    env.attach(page)
    play(env, 7, [tap(0.1)])
    play(env, 8, [tap(0.1)])
    play(env, 7, [tap(0.1)])  # seed 7's tree was dropped for seed 8's
    assert env.counts.reused == 0
    page, whole = ScriptedPage(), ReplayingEnv(reuse=False)
    whole.attach(page)
    once, twice = play(whole, 7, [tap(0.1), DONE]), play(whole, 7, [tap(0.1), DONE])
    assert all(same_page(a, b) and a is not b for a, b in zip(once, twice, strict=True))
    assert page.calls == ["reset 7", "step 0.1", "step 0.9"] * 2 and whole.counts.reused == 0


def test_a_new_browser_after_a_crash_is_brought_to_the_prefix():
    page, env = ScriptedPage(), ReplayingEnv()
    env.attach(page)
    play(env, 7, [tap(0.1), tap(0.2)])
    fresh = ScriptedPage()
    env.attach(fresh)  # the old browser died mid-episode; the tree survives
    play(env, 7, [tap(0.1), tap(0.2), tap(0.5)])
    assert fresh.calls == ["reset 7", "step 0.1", "step 0.2", "step 0.5"]


def test_a_page_that_does_not_repeat_stops_the_run_with_the_setting_to_change():
    page, env = ScriptedPage(), ReplayingEnv()
    env.attach(page)
    play(env, 7, [tap(0.1), DONE])
    page.drift = 1  # the same seed now shows another first page
    with pytest.raises(DigiqError, match="evaluate.reuse") as err:
        play(env, 7, [tap(0.1), tap(0.2)])
    assert "scripted seed 7: the page after 0 action(s) differed" in str(err.value)
