"""The MiniWoB adapter: real episodes in real headless Chromium (Debian chromium + chromium-driver)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from digiq.envs.browser_cleanup import PROFILE_PREFIX, wait_for_exit
from digiq.envs.miniwob import BrowserConfig, MiniWoBEnv, check_tasks
from digiq.envs.page import to_env_action, to_pixels
from digiq.envs.view import StepView, observation_text, previous_actions
from digiq.errors import DigiqError
from digiq.schema import Action

W, H = 160.0, 210.0


def _centre(element: dict) -> tuple[float, float]:
    y0, x0, y1, x1 = element["bbox"]
    return (y0 + y1) / 2, (x0 + x1) / 2


def _one(elements: list[dict], **match) -> dict:
    found = [e for e in elements if all(e.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def _descendants(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _sha(frame: np.ndarray) -> str:
    return hashlib.sha256(frame.tobytes()).hexdigest()


# --- pure mapping (no browser) -----------------------------------------------------------------------


def test_taps_map_to_clipped_pixels():
    assert to_env_action(Action.tap(0.5, 0.25), W, H).kind == "CLICK_COORDS"
    assert to_pixels((0.5, 0.25), W, H) == (40.0, 105.0)  # (left, top) = (x·W, y·H)
    assert to_pixels((1.0, 1.0), W, H) == (W - 0.5, H - 0.5)  # never off the page
    assert to_pixels((0.0, 0.0), W, H) == (0.5, 0.5)


def test_swipes_scroll_and_keys_map():
    up = to_env_action(Action.swipe((0.7, 0.5), (0.3, 0.5)), W, H)  # finger moves up: page scrolls down
    down = to_env_action(Action.swipe((0.3, 0.5), (0.7, 0.5)), W, H)
    assert (up.kind, down.kind) == ("SCROLL_DOWN_COORDS", "SCROLL_UP_COORDS")
    assert to_env_action(Action.swipe((0.5, 0.2), (0.5, 0.8)), W, H).kind == "NONE"  # no horizontal wheel
    assert to_env_action(Action.type_text("abc"), W, H).text == "abc"
    assert to_env_action(Action.simple("PRESS_ENTER"), W, H).key == "<Enter>"
    assert to_env_action(Action.simple("STATUS_TASK_COMPLETE"), W, H).kind == "COMPLETE"


@pytest.mark.parametrize("kind", ["PRESS_BACK", "PRESS_HOME"])
def test_back_and_home_are_rejected(kind):
    with pytest.raises(DigiqError, match=f"{kind} has no meaning on a MiniWoB web page"):
        to_env_action(Action.simple(kind), W, H)


def test_observation_text_is_the_official_form_and_round_trips():
    goal = 'Enter "Jerald" into the text field and press Submit.'
    history = [Action.tap(0.3, 0.4), Action.type_text("Jerald"), Action.simple("PRESS_ENTER")]
    assert observation_text(goal, [], 1) == f"Previous Actions: Goal: {goal}</s>"
    text = observation_text(goal, history, 2)
    assert text == (
        'Previous Actions: "action_type": "TYPE", "touch_point": "[-1.0, -1.0]", "lift_point": "[-1.0, -1.0]", '
        '"typed_text": "Jerald" "action_type": "PRESS_ENTER", "touch_point": "[-1.0, -1.0]", '
        f'"lift_point": "[-1.0, -1.0]", "typed_text": "" Goal: {goal}</s>'
    )
    assert previous_actions(text, goal) == history[-2:]
    with pytest.raises(DigiqError, match="not an observation text"):
        previous_actions("Goal: x</s>", goal)


def test_unknown_task_is_refused_with_a_suggestion():
    with pytest.raises(DigiqError, match="unknown MiniWoB task 'click-buton'; did you mean 'click-button'"):
        check_tasks(["click-buton"])


def test_missing_chromium_is_a_clear_error(tmp_path):
    with pytest.raises(DigiqError, match="browser.binary: no executable at"):
        BrowserConfig(binary=str(tmp_path / "chromium")).check()


# --- real browser ------------------------------------------------------------------------------------


@pytest.mark.browser
def test_real_episode_maps_actions_rewards_and_closes_the_browser():
    env = MiniWoBEnv("enter-text")
    try:
        driver_pid = env.browser_pids()[0]
        browser_pids = _descendants(driver_pid)
        assert len(browser_pids) >= 2  # chromedriver and Chromium
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in browser_pids if Path(f"/proc/{p}/cmdline").exists()]
        assert any(b"--disable-quic" in c and b"--user-data-dir=" in c for c in cmdlines)  # CHROMIUM_FLAGS reach Chromium

        obs = env.reset(seed=3)
        assert obs.screenshot.shape == (210, 160, 3) and obs.screenshot.dtype == np.uint8
        word = obs.goal.split('"')[1]
        field = _one(obs.elements, tag="input_text")
        assert field["value"] == "" and not field["focused"]

        tapped = env.step(Action.tap(*_centre(field)))  # tap → CLICK_COORDS on the field
        assert not tapped.done and tapped.raw_reward == 0.0
        assert _one(tapped.observation.elements, tag="input_text")["focused"]

        typed = env.step(Action.type_text(word))  # TYPE → TYPE_TEXT into the focused field
        assert _one(typed.observation.elements, tag="input_text")["value"] == word
        assert _sha(typed.observation.screenshot) != _sha(tapped.observation.screenshot)

        entered = env.step(Action.simple("PRESS_ENTER"))  # PRESS_ENTER → PRESS_KEY "<Enter>" (no submit here)
        assert not entered.done
        scrolled = env.step(Action.swipe((0.7, 0.5), (0.3, 0.5)))  # swipe → SCROLL
        assert not scrolled.done and not scrolled.failed
        corner = env.step(Action.tap(1.0, 1.0))  # the page's corner: clipped, not out of bounds
        assert not corner.failed

        with pytest.raises(DigiqError, match="PRESS_BACK has no meaning"):
            env.step(Action.simple("PRESS_BACK"))

        button = _one(corner.observation.elements, tag="button")
        final = env.step(Action.tap(*_centre(button)))
        assert final.done and final.raw_reward == 1.0 and not final.timed_out
        assert final.observation is None
        # the page as the final tap left it, not MiniWoB's all-black START frame
        assert final.final_screenshot.shape == (210, 160, 3) and final.final_screenshot.any()
        with pytest.raises(DigiqError, match="episode is over"):
            env.step(Action.tap(0.5, 0.5))

        again = env.reset(seed=3)  # reset(seed) is reproducible
        assert _sha(again.screenshot) == _sha(obs.screenshot) and again.goal == obs.goal
    finally:
        env.close()
    assert wait_for_exit(browser_pids) == []
    mine = f"{PROFILE_PREFIX}{os.getpid()}-".encode()  # not the browsers of other test runs on this machine
    leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline") if mine in _read(p)]
    assert leftovers == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""


@pytest.mark.browser
def test_task_complete_ends_the_episode_and_time_outs_are_reported():
    with MiniWoBEnv("click-button", BrowserConfig(time_limit_s=1.0)) as env:
        obs = env.reset(seed=1)
        done = env.step(Action.simple("STATUS_TASK_COMPLETE"))
        assert done.done and done.raw_reward == 0.0 and _sha(done.final_screenshot) == _sha(obs.screenshot)

        env.reset(seed=2)
        time.sleep(1.5)  # the page's own clock runs out while the policy "thinks"
        late = env.step(Action.tap(0.05, 0.05))
        assert late.done and late.timed_out and late.raw_reward == -1.0 and late.reason == "timed out"


@pytest.mark.browser
def test_an_env_told_not_to_keep_the_final_page_ends_episodes_without_a_screenshot():
    with MiniWoBEnv("click-button", final_screenshot=False) as env:
        env.reset(seed=1)
        declared = env.step(Action.simple("STATUS_TASK_COMPLETE"))
        assert declared.done and declared.final_screenshot is None

        obs = env.reset(seed=1)
        button = _one(obs.elements, tag="button", text=obs.goal.split('"')[1])
        pressed = env.step(Action.tap(*_centre(button)))
        assert pressed.done and pressed.raw_reward == 1.0 and pressed.final_screenshot is None


@pytest.mark.browser
def test_behavior_rollout_reports_success_per_task():
    from digiq.collection import roll_out
    from digiq.config import CollectParams
    from digiq.envs.policy import PolicySpec

    result = roll_out(PolicySpec("behavior", {"noise": 0.3}), CollectParams(tasks=["click-button"], workers=1), episodes=3, seed=5)
    stats = result.per_task["click-button"]
    assert stats["episodes"] == 3 and 0.0 <= stats["success"] <= 1.0 and stats["mean_steps"] >= 1
    assert [e["index"] for e in result.episodes] == [0, 1, 2]


def test_step_view_is_the_same_live_and_offline():
    from digiq.envs.rollout import elements_json
    from digiq.schema import Step

    elements = [{"ref": 1, "parent": 0, "tag": "button", "text": "Ok", "value": None, "id": "", "classes": "",
                 "bbox": [0.3, 0.1, 0.4, 0.3], "focused": False, "tampered": False, "leaf": True}]
    history = [Action.tap(0.35, 0.2)]
    live = StepView.live("click-button", 'Click on the "Ok" button.', elements, history, 1)
    step = Step(traj_id="t", step_id=1, task="click-button", goal=live.goal, observation=live.observation,
                screenshot="screenshots/aa/x.png", screenshot_sha256="0" * 64, elements=elements_json(elements),
                action=Action.tap(0.35, 0.2), reward=0.0, done=False)
    offline = StepView.from_step(step)
    assert (offline.goal, offline.observation, offline.elements, offline.previous_actions) == (
        live.goal, live.observation, live.elements, live.previous_actions)


DESIGN_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


@pytest.mark.browser
def test_chromium_runs_with_the_design_flags_on_its_own_profile_which_close_removes():
    browser = BrowserConfig()
    with MiniWoBEnv("click-button", browser) as env:
        processes = [_args(pid) for pid in _descendants(env.browser_pids()[0])]
        main = [args for args in processes if args[:1] == [browser.binary] and not any(a.startswith("--type=") for a in args)]
    assert len(main) == 1  # the browser process itself (its renderers and helpers carry --type=)
    assert set(DESIGN_FLAGS) <= set(main[0])
    profile = Path(next(a for a in main[0] if a.startswith("--user-data-dir=")).split("=", 1)[1])
    assert profile.parent == Path(tempfile.gettempdir()) and profile.name.startswith(f"{PROFILE_PREFIX}{os.getpid()}-")
    assert not profile.exists()


def _args(pid: int) -> list[str]:
    return [a.decode() for a in _read(Path(f"/proc/{pid}/cmdline")).split(b"\0") if a]


def test_browser_paths_come_from_the_environment_else_from_debian(monkeypatch):
    monkeypatch.delenv("MINIWOB_CHROME_BINARY", raising=False)
    monkeypatch.delenv("MINIWOB_CHROMEDRIVER", raising=False)
    assert (BrowserConfig().binary, BrowserConfig().driver) == ("/usr/lib/chromium/chromium", "/usr/bin/chromedriver")
    monkeypatch.setenv("MINIWOB_CHROME_BINARY", "/opt/chrome/chrome")
    monkeypatch.setenv("MINIWOB_CHROMEDRIVER", "/opt/chrome/chromedriver")
    assert (BrowserConfig().binary, BrowserConfig().driver) == ("/opt/chrome/chrome", "/opt/chrome/chromedriver")


def test_action_description_names_the_control_under_a_tap():
    from digiq.envs.rollout import action_description
    from digiq.schema import Action

    elements = [
        {"tag": "input_password", "id": "password", "text": "", "bbox": [0.30, 0.10, 0.40, 0.90], "leaf": False},
        {"tag": "button", "id": "subbtn", "text": " Log\n in ", "bbox": [0.50, 0.10, 0.60, 0.30], "leaf": True},
    ]
    assert action_description(Action.tap(0.35, 0.5), elements) == 'tap (y=0.35, x=0.50) on "input_password#password"'
    assert action_description(Action.tap(0.55, 0.2), elements) == 'tap (y=0.55, x=0.20) on "Log in"'
    assert action_description(Action.tap(0.9, 0.9), elements) == "tap (y=0.90, x=0.90)"
    assert action_description(Action.type_text("kanye"), elements) == 'type "kanye"'
