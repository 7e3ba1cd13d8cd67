"""π_β: deterministic for a seed, diverse, grounded in the DOM, fast enough for K = 64 offline.

The element lists are MiniWoB pages as the adapter records them (captured from real episodes of
login-user and click-checkboxes with miniwob 1.1.0).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from digiq.envs.behavior import IMPATIENT, BehaviorPolicy, goal_phrases, scores_with
from digiq.envs.policy import Policy, PolicySpec
from digiq.envs.view import StepView
from digiq.envs.rollout import elements_json
from digiq.errors import DigiqError
from digiq.schema import Action, Step


def _el(ref, parent, tag, bbox, text="", value=None, id="", focused=False, leaf=True, tampered=False, classes=""):
    return {"ref": ref, "parent": parent, "tag": tag, "text": text, "value": value, "id": id, "classes": classes,
            "bbox": bbox, "focused": focused, "tampered": tampered, "leaf": leaf}


LOGIN_GOAL = 'Enter the username "vina" and the password "US" into the text fields and press login.'


def login_page(username="", password="", focus=None):
    return [
        _el(1, 0, "body", [0.0, 0.0, 1.0, 1.0], leaf=False),
        _el(2, 1, "div", [0.0, 0.0, 1.0, 1.0], id="wrap", leaf=False),
        _el(3, 2, "div", [0.2381, 0.0, 0.9476, 1.0], id="area", leaf=False),
        _el(4, 3, "div", [0.2952, 0.0125, 0.9381, 0.9875], id="form", leaf=False),
        _el(5, 4, "p", [0.2952, 0.0125, 0.4952, 0.9875], leaf=False),
        _el(6, 5, "label", [0.2952, 0.0125, 0.3476, 0.3147], text="Username", classes="bold"),
        _el(7, 5, "input_text", [0.3714, 0.0437, 0.4714, 0.8438], value=username, id="username", focused=focus == "username"),
        _el(8, 4, "p", [0.5429, 0.0125, 0.7429, 0.9875], leaf=False),
        _el(9, 8, "label", [0.5429, 0.0125, 0.5952, 0.3078], text="Password", classes="bold"),
        _el(10, 8, "input_password", [0.619, 0.0437, 0.719, 0.7188], value=password, id="password", focused=focus == "password"),
        _el(11, 4, "button", [0.7905, 0.0125, 0.9381, 0.5539], text="Login", id="subbtn", classes="secondary-action"),
    ]


CHECKBOX_GOAL = "Select DKkQH and click Submit."


def checkbox_page(checked=False):
    return [
        _el(1, 0, "body", [0.0, 0.0, 1.0, 1.0], leaf=False),
        _el(2, 1, "div", [0.0, 0.0, 1.0, 1.0], id="wrap", leaf=False),
        _el(3, 2, "div", [0.2381, 0.0, 0.6381, 1.0], id="area", leaf=False),
        _el(4, 3, "div", [0.2476, 0.0125, 0.4286, 0.9875], id="boxes", leaf=False),
        _el(5, 4, "label", [0.281, 0.0125, 0.3333, 0.3028], leaf=False),
        _el(6, 5, "input_checkbox", [0.2619, 0.0375, 0.3238, 0.1625], value=False, id="ch0"),
        _el(-1, 5, "t", [0.281, 0.1812, 0.3333, 0.3028], text="USa"),
        _el(7, 4, "label", [0.3714, 0.0125, 0.4238, 0.3932], leaf=False),
        _el(8, 7, "input_checkbox", [0.3524, 0.0375, 0.4143, 0.1625], value=checked, id="ch1"),
        _el(-2, 7, "t", [0.3714, 0.1812, 0.4238, 0.3932], text="DKkQH"),
        _el(9, 3, "button", [0.481, 0.0125, 0.6286, 0.6093], text="Submit", id="subbtn", classes="secondary-action"),
    ]


def view(goal, elements, history=()):
    return StepView.live("t", goal, elements, list(history), 1)


def prob_of(policy, v, predicate):
    """Total probability of the candidates matching predicate(candidate)."""
    candidates = policy.candidates(v)
    probs = policy.probabilities(candidates)
    return float(sum(p for c, p in zip(candidates, probs) if predicate(c)))


def taps_on(element):
    return lambda c: c.kind == "tap" and list(c.bbox) == element["bbox"]


def test_goal_phrases_are_quoted_strings_else_content_words():
    assert goal_phrases(LOGIN_GOAL) == ["vina", "US"]
    assert goal_phrases("Select Bobine from the list and click Submit.") == ["Bobine"]
    assert goal_phrases('Click on the link "euismod.".') == ["euismod."]


def test_sampling_is_deterministic_for_a_seed_and_differs_across_seeds():
    policy = BehaviorPolicy(noise=0.3)
    v = view(LOGIN_GOAL, login_page())
    first = policy.sample(v, 64, np.random.default_rng(7))
    again = policy.sample(v, 64, np.random.default_rng(7))
    other = policy.sample(v, 64, np.random.default_rng(8))
    assert first == again and first != other
    live_a, live_b = BehaviorPolicy(0.3, seed=3), BehaviorPolicy(0.3, seed=0)
    live_b.reset(3)
    assert [live_a.act(v) for _ in range(5)] == [live_b.act(v) for _ in range(5)]


def test_sixty_four_candidates_hold_good_and_bad_actions():
    policy = BehaviorPolicy(noise=0.3)
    page = login_page(focus="username")
    actions = policy.sample(view(LOGIN_GOAL, page, [Action.tap(0.42, 0.4)]), 64, np.random.default_rng(0))
    kinds = Counter(a.kind for a in actions)
    assert kinds["tap"] >= 10 and kinds["type"] >= 10
    assert len({str(a) for a in actions}) >= 12  # diverse, not one action repeated (19 distinct here)
    typed = Counter(a.typed_text for a in actions if a.kind == "type")
    assert typed["vina"] > typed["US"] > 0  # the cue word "username" names the focused field
    def on(element):
        y0, x0, y1, x1 = element["bbox"]
        return sum(a.kind == "tap" and y0 <= a.touch_point[0] <= y1 and x0 <= a.touch_point[1] <= x1 for a in actions)
    assert on(page[9]) > 0  # the password field
    assert on(page[10]) > 0  # pressing Login now would fail: a bad candidate is there too


def test_heuristics_are_grounded_in_the_page():
    policy = BehaviorPolicy(noise=0.0)
    empty, filled = login_page(), login_page(username="vina", password="US")
    login_empty = prob_of(policy, view(LOGIN_GOAL, empty), taps_on(empty[10]))
    login_filled = prob_of(policy, view(LOGIN_GOAL, filled), taps_on(filled[10]))
    assert login_filled > 5 * login_empty  # don't submit before filling the fields

    unchecked, checked = checkbox_page(), checkbox_page(checked=True)
    target = prob_of(policy, view(CHECKBOX_GOAL, unchecked), taps_on(unchecked[8]))
    other = prob_of(policy, view(CHECKBOX_GOAL, unchecked), taps_on(unchecked[5]))
    assert target > 5 * other  # the box whose label the goal names
    assert prob_of(policy, view(CHECKBOX_GOAL, checked), taps_on(checked[8])) < target / 5  # don't untick it
    assert prob_of(policy, view(CHECKBOX_GOAL, checked), taps_on(checked[10])) > 0.3  # then submit

    last = Action.tap(*[(a + b) / 2 for a, b in zip(unchecked[8]["bbox"][:2], unchecked[8]["bbox"][2:])])
    repeat = prob_of(policy, view(CHECKBOX_GOAL, unchecked, [last]), taps_on(unchecked[8]))
    assert repeat < target  # don't repeat the previous tap


def _most_likely(policy, v):
    candidates = policy.candidates(v)
    return candidates[int(np.argmax(policy.probabilities(candidates)))]


def test_the_impatient_policy_submits_a_partly_filled_form_and_the_patient_one_does_not():
    half = login_page(username="vina")  # username typed, password still empty
    v = view(LOGIN_GOAL, half, [Action.type_text("vina")])
    patient, impatient = BehaviorPolicy(noise=0.0), BehaviorPolicy(noise=0.0, scores=IMPATIENT)
    assert impatient.scores.submit_partial == impatient.scores.submit_ready == 1.5
    assert taps_on(half[9])(_most_likely(patient, v))  # the password field
    assert taps_on(half[10])(_most_likely(impatient, v))  # "Login": the systematic mistake
    # its noise still proposes the password field often, so the data hold the correction
    assert prob_of(BehaviorPolicy(noise=0.3, scores=IMPATIENT), v, taps_on(half[9])) > 0.2
    # on an untouched form both fill the fields first, and on a finished one both submit
    for policy in (patient, impatient):
        assert not taps_on(half[10])(_most_likely(policy, view(LOGIN_GOAL, login_page())))
        assert taps_on(half[10])(_most_likely(policy, view(LOGIN_GOAL, login_page("vina", "US"))))


PASSWORD_GOAL = 'Enter the password "Kvp" into both text fields and press submit.'


def password_page(password="", verify="", focus=None):
    """enter-password's page (miniwob 1.1.0): the login form's layout with one value asked twice."""
    page = login_page(password, verify, {"password": "username", "verify": "password"}.get(focus))
    page[5].update(text="Password")
    page[6].update(tag="input_password", id="password")
    page[8].update(text="Verify password")
    page[9].update(id="verify")
    page[10].update(text="Submit")
    return page


def test_fill_all_fills_a_field_left_empty_once_every_phrase_is_typed_and_is_off_by_default():
    half = password_page(password="Kvp")  # the one phrase is typed: nothing is "pending" any more
    v = view(PASSWORD_GOAL, half, [Action.type_text("Kvp")])
    verify = next(c for c in BehaviorPolicy().candidates(v) if taps_on(half[9])(c))
    assert verify.score == 0.0  # the default (fill_all 0): the empty field scores as any unnamed control
    submit = next(c for c in BehaviorPolicy().candidates(v) if taps_on(half[10])(c))
    assert submit.score == pytest.approx(1.5 + 3.0 * 0.8)  # submit_ready + goal_match × relevance ("submit")
    assert taps_on(half[10])(_most_likely(BehaviorPolicy(noise=0.0), v))  # so π_β submits with one field empty
    eager = BehaviorPolicy(noise=0.0, scores={"fill_all": 5.0})
    assert next(c for c in eager.candidates(v) if taps_on(half[9])(c)).score == 5.0
    assert taps_on(half[9])(_most_likely(eager, v))  # the verify field first
    focused = view(PASSWORD_GOAL, password_page(password="Kvp", focus="verify"), [Action.tap(0.67, 0.38)])
    assert _most_likely(eager, focused).text == "Kvp"  # 2.5 + cue 1.5: "password" names "Verify password"
    done = password_page(password="Kvp", verify="Kvp")
    assert taps_on(done[10])(_most_likely(eager, view(PASSWORD_GOAL, done, [Action.type_text("Kvp")])))
    # while a phrase is untyped, fill_all changes nothing: the login form scores the same with and without it
    for page in (login_page(), login_page(username="vina"), login_page(username="vina", focus="username")):
        plain, filling = BehaviorPolicy().candidates(view(LOGIN_GOAL, page)), eager.candidates(view(LOGIN_GOAL, page))
        assert [c.score for c in plain] == [c.score for c in filling]


@pytest.mark.parametrize("overrides, field", [({"submit_parital": 1.0}, "collect.behavior.submit_parital"),
                                              ({"submit_partial": "high"}, "collect.behavior.submit_partial"),
                                              ({"submit_partial": float("nan")}, "collect.behavior.submit_partial")])
def test_unknown_or_non_numeric_weights_are_refused_by_name(overrides, field):
    with pytest.raises(DigiqError) as err:
        scores_with(overrides)
    assert err.value.field == field


def test_noise_mixes_in_the_uniform_distribution():
    v = view(LOGIN_GOAL, login_page())
    uniform = BehaviorPolicy(noise=1.0)
    probs = uniform.probabilities(uniform.candidates(v))
    assert np.allclose(probs, 1.0 / len(probs))
    greedy = BehaviorPolicy(noise=0.0).probabilities(uniform.candidates(v))
    assert greedy.max() > 2 * probs.max()
    with pytest.raises(DigiqError, match="noise: must be in \\[0, 1\\]"):
        BehaviorPolicy(noise=1.5)


def test_sample_works_offline_on_a_stored_step_and_is_fast():
    policy = BehaviorPolicy(noise=0.3)
    history = [Action.tap(0.42, 0.4)]
    v = view(LOGIN_GOAL, login_page(focus="username"), history)
    steps = [
        Step(traj_id=f"t{i}", step_id=1, task="login-user", goal=LOGIN_GOAL, observation=v.observation,
             screenshot="screenshots/aa/x.png", screenshot_sha256="0" * 64, elements=elements_json(v.elements),
             action=Action.type_text("vina"), reward=0.0, done=False)
        for i in range(2000)
    ]
    assert policy.sample(steps[0], 64, np.random.default_rng(1)) == policy.sample(v, 64, np.random.default_rng(1))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    candidates = [policy.sample(step, 64, rng) for step in steps]
    seconds = time.perf_counter() - started
    assert sum(map(len, candidates)) == 2000 * 64
    assert seconds < 15, f"2000 states × 64 candidates took {seconds:.1f} s"  # loose: the cores are shared (docs/benchmarks.md)


def test_policies_plug_in_by_name_or_import_path():
    assert isinstance(BehaviorPolicy(), Policy)
    assert isinstance(PolicySpec("behavior", {"noise": 0.1}).build(), BehaviorPolicy)
    assert isinstance(PolicySpec("digiq.envs.behavior:BehaviorPolicy").build(), BehaviorPolicy)
    with pytest.raises(DigiqError, match="unknown policy 'greedy'"):
        PolicySpec("greedy").build()
    with pytest.raises(DigiqError, match="did not build a policy"):
        PolicySpec("digiq.envs.behavior:goal_phrases", {"goal": "x"}).build()


def test_element_names_and_field_values_are_one_line_of_at_most_forty_characters():
    from digiq.envs.behavior import element_name, field_values

    long_text = "Lorem  ipsum\n dolor sit amet, consectetur adipiscing elit"
    assert element_name({"tag": "button", "text": " Log\n  in "}) == "Log in"
    assert element_name({"tag": "span", "text": long_text}) == "Lorem ipsum dolor sit amet, consectetur…"
    assert element_name({"tag": "input_text", "text": "", "id": "user"}) == "input_text#user"
    assert element_name({"tag": "div"}) == "div"
    line = field_values([{"tag": "input_text", "id": "tt", "value": long_text}])
    assert line == 'Text fields: input_text#tt holds "Lorem ipsum dolor sit amet, consectetur…".'
    assert len("Lorem ipsum dolor sit amet, consectetur…") == 40
