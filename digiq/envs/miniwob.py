"""MiniWoB++ in headless Chromium, speaking the AitW action language.

    with MiniWoBEnv("click-button") as env:
        obs = env.reset(seed=7)
        result = env.step(Action.tap(0.40, 0.12))

The adapter wraps ``gymnasium.make("miniwob/<task>-v1")``. Its browser is started by a subclass of
miniwob's SeleniumInstance (``CHROMIUM_FLAGS``, flags for reproducible pixels among them, a fresh
profile per browser, cleaned up even after a crash), and a few settings make episodes faithful and
reproducible:

* the episode clock (MiniWoB: 10 s) is raised to ``time_limit_s``; an episode that runs out of time
  still ends (reward −1, reason "timed out") and is reported as ``timed_out``;
* MiniWoB covers the page with its START screen the moment an episode ends and returns an all-black
  frame. We keep the cover hidden and screenshot the page as the final action left it, so a terminal
  transition has a real next frame (``StepResult.final_screenshot``) instead of the black one;
* the text caret is made transparent and the autocomplete delay set to 0, so equal seeds and actions
  give byte-identical screenshots (a blinking caret or a 300 ms suggestion delay would make them
  depend on timing);
* typed text is sent one key at a time, and after every action the page runs the zero-delay timers the
  action queued before it is observed (an autocomplete search per keystroke), so observations do
  not depend on timing;
* the task page is reloaded before every episode (``fresh_page``) and the mouse parked outside the
  task area, so an episode is a function of (task, seed, actions) only — not of the episodes the same
  browser ran before. Without the reload, state leaks: MiniWoB marks the button that ended an episode
  "tampered" in the next one, jQuery UI widgets keep their state and id counters, focus stays where
  it was. The reload costs browser CPU on every episode, a visible share of collection throughput
  (docs/benchmarks.md).

How actions map onto the page and how its DOM is read: :mod:`digiq.envs.page`; ending the browsers and
deleting the profiles a crash left behind: :mod:`digiq.envs.browser_cleanup`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digiq.envs.browser_cleanup import PROFILE_PREFIX, kill_profile_processes
from digiq.envs.page import EnvAction, dom_elements, to_env_action
from digiq.errors import DigiqError
from digiq.schema import Action

DEBIAN_CHROMIUM = "/usr/lib/chromium/chromium"  # the /usr/bin/chromium wrapper misbehaves under chromedriver
DEBIAN_CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    # deterministic pixels: with partial raster, re-rastered tiles can differ by 1 level at anti-aliased
    # edges depending on timing (docs/benchmarks.md); fixed colour profile/text AA
    "--disable-partial-raster",
    "--force-color-profile=srgb",
    "--disable-lcd-text",
    "--font-render-hinting=none",
)

# Runs before every episode (idempotent). See the module docstring for why each line is there.
_PAGE_SETTINGS_JS = """
core.EPISODE_MAX_TIME = arguments[0];
if (!core.digiqKeepsFinalPage) {
  core.digiqKeepsFinalPage = true;
  core.startEpisode = function () { core.createDisplay(); };
}
if (!document.getElementById('digiq-style')) {
  var style = document.createElement('style');
  style.id = 'digiq-style';
  style.textContent = '* { caret-color: transparent !important; }';
  document.head.appendChild(style);
}
if (window.jQuery) {
  jQuery.fx.off = true;
  if (jQuery.ui && jQuery.ui.autocomplete) { jQuery.ui.autocomplete.prototype.options.delay = 0; }
}
"""
# Runs after every action (and every typed key), before the observation: lets zero-delay timers the
# action queued (e.g. an autocomplete search per keystroke) finish, so what is observed — down to the
# ids jQuery UI numbers its menu items with — does not depend on timing.
# Upstream reads the episode status right after each action, so the settling is folded into that read.
_SETTLE_JS = "var done = arguments[arguments.length - 1]; setTimeout(function () { setTimeout(done, 0); }, 0);"
_SETTLED_METADATA_JS = """
var done = arguments[arguments.length - 1];
setTimeout(function () { setTimeout(function () {
  done({done: WOB_DONE_GLOBAL, env_reward: WOB_REWARD_GLOBAL, raw_reward: WOB_RAW_REWARD_GLOBAL, reason: WOB_REWARD_REASON});
}, 0); }, 0);
"""
# Runs after genProblem() built the page when pages are not reloaded (widgets created by earlier
# episodes keep their options).
_EPISODE_SETTINGS_JS = """
if (window.jQuery && jQuery.ui && jQuery.ui.autocomplete) {
  jQuery(':data(ui-autocomplete)').autocomplete('option', 'delay', 0);
}
"""


class BrowserError(RuntimeError):
    """The browser or its driver failed (crashed, hung up, refused a command): restart it and retry."""


@dataclass(frozen=True)
class BrowserConfig:
    """Which Chromium to start and how."""

    binary: str = field(default_factory=lambda: os.environ.get("MINIWOB_CHROME_BINARY") or DEBIAN_CHROMIUM)
    driver: str = field(default_factory=lambda: os.environ.get("MINIWOB_CHROMEDRIVER") or DEBIAN_CHROMEDRIVER)
    flags: tuple[str, ...] = CHROMIUM_FLAGS
    time_limit_s: float = 60.0  # episode clock inside the page (MiniWoB's default is 10 s)
    fresh_page: bool = True  # reload the task page before every episode (no state leaks between episodes)

    def check(self) -> None:
        for name, path in (("binary", self.binary), ("driver", self.driver)):
            if not (Path(path).is_file() and os.access(path, os.X_OK)):
                raise DigiqError(
                    f"no executable at {path} (install Debian's chromium and chromium-driver, or set "
                    "MINIWOB_CHROME_BINARY and MINIWOB_CHROMEDRIVER)",
                    field=f"browser.{name}",
                )
        if self.time_limit_s <= 0:
            raise DigiqError(f"must be positive, got {self.time_limit_s}", field="browser.time_limit_s")


@dataclass
class Observation:
    """What the agent sees at one state."""

    goal: str  # the task utterance
    screenshot: np.ndarray  # H×W×3 uint8, the task area only (160×210 on MiniWoB)
    elements: list[dict[str, Any]]  # visible DOM elements, see dom_elements()


@dataclass
class StepResult:
    observation: Observation | None  # None once the episode is over
    raw_reward: float  # MiniWoB's raw reward (no time penalty); 0 until the episode ends
    done: bool
    final_screenshot: np.ndarray | None = None  # the page as the final action left it (terminal steps of an env that takes it)
    timed_out: bool = False
    reason: str | None = None  # MiniWoB's reward reason, or why the step failed
    failed: bool = False  # the action could not be performed (e.g. a point off the page)


def _selenium_instance_class():
    """miniwob's SeleniumInstance with our driver creation (imported lazily: selenium is heavy)."""
    from miniwob.action import ActionTypes
    from miniwob.selenium_actions import execute_action_on_chromedriver, execute_type_text
    from miniwob.selenium_instance import SeleniumInstance
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.wait import WebDriverWait

    class DigiqSeleniumInstance(SeleniumInstance):
        def __init__(self, *args: Any, browser: BrowserConfig, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.browser = browser
            self.profile_dir: str | None = None

        def create_driver(self) -> None:
            options = webdriver.ChromeOptions()
            for flag in self.browser.flags:
                options.add_argument(flag)
            self.profile_dir = tempfile.mkdtemp(prefix=f"{PROFILE_PREFIX}{os.getpid()}-")
            options.add_argument(f"--user-data-dir={self.profile_dir}")
            options.binary_location = self.browser.binary
            try:
                self.driver = webdriver.Chrome(service=Service(executable_path=self.browser.driver), options=options)
                self.driver.implicitly_wait(5)
                self.driver.get(self.url)
                WebDriverWait(self.driver, 10).until(EC.element_to_be_clickable((By.ID, self.SYNC_SCREEN_ID)))
                self.inner_width, self.inner_height = self.driver.execute_script("return [window.innerWidth, window.innerHeight];")
            except BaseException as exc:  # nothing holds this instance yet: do not leave a browser behind
                self.close()
                if isinstance(exc, TimeoutException):
                    raise BrowserError(f"MiniWoB page {self.url} did not load") from None
                raise

        def _reloads(self) -> bool:
            return self.browser.fresh_page and self.num_episodes > 0  # the first episode has a fresh page already

        def force_stop(self) -> None:
            if not self._reloads():  # a reload ends the old episode anyway
                super().force_stop()

        def begin_task(self, seed: Any = None) -> None:
            """Upstream's begin_task (seed, data mode, start, wait until ready) in one round trip, plus our settings."""
            if self._reloads():
                self.driver.get(self.url)
            self.num_episodes += 1
            self._park_pointer()
            setup = [_PAGE_SETTINGS_JS, f"Math.seedrandom({seed!r});" if seed is not None else "",
                     f"core.setDataMode({json.dumps(self.mode)});", "core.startEpisodeReal();",
                     "" if self.browser.fresh_page else _EPISODE_SETTINGS_JS, "return WOB_TASK_READY;"]
            ready = self.driver.execute_script("\n".join(setup), int(self.browser.time_limit_s * 1000))
            for _ in range(self.RESET_BLOCK_MAX_ATTEMPT):
                if ready:
                    break
                time.sleep(self.RESET_BLOCK_SLEEP_TIME)
                ready = self.driver.execute_script("return WOB_TASK_READY;")
            else:
                raise BrowserError(f"MiniWoB task {self.url} did not become ready")
            self.start_time = time.time()

        def perform(self, action: Any, action_space_config: Any) -> None:
            # Upstream first asks the page whether the episode is over; MiniWoBEnv knows (steps after the
            # end are refused there), and a page whose clock ran out ignores actions: one round trip saved.
            if action is None:
                return
            if action_space_config.action_types[action["action_type"]] != ActionTypes.TYPE_TEXT:
                execute_action_on_chromedriver(action, self.cached_fields, action_space_config, self.driver)
                return
            for n, char in enumerate(action["text"]):  # one key at a time, the page reacting to each (as a person types)
                if n:
                    self.driver.execute_async_script(_SETTLE_JS)
                execute_type_text(char, self.driver)

        def get_metadata(self) -> dict[str, Any]:
            """MiniWoB's episode status, read once the page has run what the last action queued (see _SETTLE_JS)."""
            return self.driver.execute_async_script(_SETTLED_METADATA_JS)

        def _park_pointer(self) -> None:
            """Move the mouse off the task area, so no element starts an episode hovered."""
            chain = ActionChains(self.driver, duration=0)
            chain.w3c_actions.pointer_action.move_to_location(self.inner_width - 1, self.inner_height - 1)
            chain.w3c_actions.perform()

        def close(self) -> None:
            if hasattr(self, "driver"):
                super().close()
            if self.profile_dir:
                # a crashed driver cannot quit its Chromium: end whatever still runs on our profile
                kill_profile_processes(self.profile_dir)
                shutil.rmtree(self.profile_dir, ignore_errors=True)
                self.profile_dir = None

    return DigiqSeleniumInstance


def _env_class(entry_class: type) -> type:
    """The registered MiniWoB env class, starting its browser through DigiqSeleniumInstance."""
    instance_class = _selenium_instance_class()

    class DigiqEnv(entry_class):  # type: ignore[misc, valid-type]
        def __init__(self, *, browser: BrowserConfig, **kwargs: Any):
            self.browser = browser
            super().__init__(**kwargs)

        def _hard_reset_instance(self) -> None:
            if getattr(self, "instance", None):
                self.instance.close()
            self.instance = instance_class(index=0, browser=self.browser, **self.instance_kwargs)
            self.instance.start()
            self.instance.wait()

    DigiqEnv.__name__ = DigiqEnv.__qualname__ = f"Digiq{entry_class.__name__}"
    return DigiqEnv


def env_id(task: str) -> str:
    return f"miniwob/{task}-v1"


def known_tasks() -> list[str]:
    import gymnasium
    import miniwob  # noqa: F401  (registers the miniwob/* environments)

    return sorted(spec.name for spec in gymnasium.registry.values() if spec.namespace == "miniwob")


def check_tasks(tasks: list[str], field_name: str = "tasks") -> None:
    """Refuse unknown task names early, with a suggestion."""
    import difflib

    known = known_tasks()
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DigiqError(f"unknown MiniWoB task '{task}'{hint}", field=field_name)


class MiniWoBEnv:
    """One MiniWoB task in one browser. Always close it (it is a context manager)."""

    def __init__(self, task: str, browser: BrowserConfig | None = None, final_screenshot: bool = True):
        """``final_screenshot=False`` skips the screenshot of the page an episode ended on (``StepResult.
        final_screenshot`` is then None): only stored trajectories need it, and it costs a browser round trip."""
        import gymnasium
        from gymnasium.envs.registration import load_env_creator

        check_tasks([task], "task")
        self.task = task
        self.final_screenshot = final_screenshot
        self.browser = browser or BrowserConfig()
        self.browser.check()
        spec = gymnasium.spec(env_id(task))
        digiq_spec = dataclasses.replace(spec, entry_point=_env_class(load_env_creator(spec.entry_point)))
        self._env: Any = None
        try:
            self._env = gymnasium.make(digiq_spec, disable_env_checker=True, browser=self.browser)
        except Exception as exc:
            self.close()
            raise BrowserError(f"could not start Chromium for {task}: {exc}") from exc
        self._config = self.raw.action_space_config
        self.width = float(self.raw.instance.task_width)
        self.height = float(self.raw.instance.task_height)
        self._done = True

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def raw(self) -> Any:
        """The unwrapped miniwob environment."""
        return self._env.unwrapped

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()

    def __enter__(self) -> MiniWoBEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def browser_pids(self) -> list[int]:
        """Process ids of this env's chromedriver and its Chromium processes (for leak checks)."""
        service = self.raw.instance.driver.service
        return [service.process.pid] if service.process else []

    # -- episode -------------------------------------------------------------------------------
    def reset(self, seed: int) -> Observation:
        obs, info = self._call(lambda: self._env.reset(seed=int(seed)))
        self._done = False
        return self._observation(obs, info)

    def step(self, action: Action) -> StepResult:
        if self._done:
            raise DigiqError("the episode is over; call reset() first", field="action")
        env_action = to_env_action(action, self.width, self.height)
        if env_action.kind == "COMPLETE":
            self._done = True
            return StepResult(None, 0.0, True, final_screenshot=self._final_screenshot(), reason="task complete declared")
        return self._step(env_action)

    def step_env_action(self, env_action: EnvAction) -> StepResult:
        """Step with an already-mapped action (the bare-throughput benchmark uses this)."""
        return self._step(env_action)

    def screenshot(self) -> np.ndarray:
        from miniwob.screenshot import get_screenshot, pil_to_numpy_array

        inst = self.raw.instance
        image = self._call(
            lambda: get_screenshot(inst.driver, inst.inner_width, inst.inner_height, inst.task_width, inst.task_height)
        )
        return pil_to_numpy_array(image)

    def _final_screenshot(self) -> np.ndarray | None:
        return self.screenshot() if self.final_screenshot else None

    def _step(self, env_action: EnvAction) -> StepResult:
        from selenium.common.exceptions import MoveTargetOutOfBoundsException

        failed, reason = False, None
        try:
            obs, _, done, _, info = self._call(lambda: self._env.step(self._miniwob_action(env_action)), passthrough=MoveTargetOutOfBoundsException)
        except MoveTargetOutOfBoundsException as exc:  # a failed step, not a crash: nothing happened on the page
            failed, reason = True, f"move target out of bounds: {exc.msg}"
            obs, _, done, _, info = self._call(lambda: self._env.step(self._miniwob_action(EnvAction("NONE"))))
        raw_reward = float(info.get("raw_reward") or 0.0)
        reason = reason or (str(info["reason"]) if info.get("reason") is not None else None)
        if done:
            self._done = True
            return StepResult(
                None,
                raw_reward,
                True,
                final_screenshot=self._final_screenshot(),
                timed_out=reason == "timed out",
                reason=reason,
                failed=failed,
            )
        return StepResult(self._observation(obs, info), raw_reward, False, reason=reason, failed=failed)

    def _miniwob_action(self, env_action: EnvAction) -> dict[str, Any]:
        config = self._config
        action: dict[str, Any] = {"action_type": config.action_types.index(env_action.kind)}
        if env_action.kind.endswith("_COORDS"):
            action["coords"] = np.array([env_action.left, env_action.top], dtype=np.float32)
        elif env_action.kind == "TYPE_TEXT":
            action["text"] = env_action.text
        elif env_action.kind == "PRESS_KEY":
            action["key"] = list(config.allowed_keys).index(env_action.key)
        return action

    def _observation(self, obs: dict[str, Any], info: dict[str, Any]) -> Observation:
        return Observation(
            goal=str(obs["utterance"]),
            screenshot=np.ascontiguousarray(obs["screenshot"], dtype=np.uint8),
            elements=dom_elements(info["root_dom"], self.width, self.height),
        )

    @staticmethod
    def _call(fn: Any, passthrough: type[BaseException] | tuple[type[BaseException], ...] = ()) -> Any:
        """Run a browser command; driver failures become BrowserError (the caller restarts the browser)."""
        from selenium.common.exceptions import WebDriverException
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except passthrough:
            raise
        except (WebDriverException, HTTPError, RuntimeError, ConnectionError, OSError) as exc:
            raise BrowserError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
