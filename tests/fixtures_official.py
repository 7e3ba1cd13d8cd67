"""Build files in the exact shape of the official Digi-Q / DigiRL releases.

The shape follows the official code: DigiRL's ``batch_interact_environment`` (step dicts with
observation, next_observation, image_features, image_path, next_image_features, task, reward, done,
action; ``add_trajectory_reward`` and ``add_mc_return`` add numpy scalars), AutoUI's prompt
``Previous Actions: {to_autoui(prev)} Goal: {task}</s>``, AutoUI action strings with four decimals, and
Digi-Q's post-processing (action_list joined by "<split>" with index 0 the dataset action, q_rep_out_list
stacked with numpy, q_rep_out = q_rep_out_list[0], traj_id, step_id). Action strings are written here
with f-strings as the official code writes them, not with digiq.actions, so tests check our parser
against the official text.

Also: files whose unpickling would run code (for the importer's refusal tests).
"""

from __future__ import annotations

import builtins
import os
import pickle
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np

RECORDED_ROOT = "/home/digirl/logs/2024-06-01/images"  # image paths are absolute paths of another machine
ACTION_TYPES = ["DUAL_POINT", "TYPE", "PRESS_BACK", "PRESS_HOME", "PRESS_ENTER", "STATUS_TASK_COMPLETE"]
TASKS = [
    "Go to walmart.com, search for 'logitech g933'",
    "What's the news in Chile?",
    "Search for hotels in Buenos Aires",
    "Open the settings",
]
Arrays = Literal["numpy", "torch"] | None


def make_screenshots(folder: Path, count: int, *, size: tuple[int, int] = (40, 24), seed: int = 0) -> list[Path]:
    """``count`` distinct small PNG screenshots (RGBA, as Android screenshots are) named like DigiRL's."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
        pixels[0, 0, :3] = [i % 256, (i // 256) % 256, 7]  # distinct even if the generator repeats
        path = folder / f"1718747809.{seed}_{i}.png"
        Image.fromarray(pixels, mode="RGBA").save(path)
        paths.append(path)
    return paths


def autoui_decision(rng: random.Random, action_type: str | None = None) -> str:
    """The ``Action Decision`` part exactly as AutoUI / DigiRL's to_autoui write it."""
    action_type = action_type or rng.choice(ACTION_TYPES)
    if action_type == "DUAL_POINT":
        y, x = rng.random(), rng.random()
        if rng.random() < 0.8:  # tap
            ly, lx = y, x
        else:  # swipe
            ly, lx = rng.random(), rng.random()
        return (
            f'"action_type": "DUAL_POINT", "touch_point": "[{y:.4f}, {x:.4f}]", '
            f'"lift_point": "[{ly:.4f}, {lx:.4f}]", "typed_text": ""'
        )
    text = rng.choice(["logitech g933", "news in Chile", "hotels", "a \"quoted\" word"]) if action_type == "TYPE" else ""
    return f'"action_type": "{action_type}", "touch_point": "[-1.0, -1.0]", "lift_point": "[-1.0, -1.0]", "typed_text": "{text}"'


def autoui_action(rng: random.Random, action_type: str | None = None) -> str:
    """A full AutoUI output: ``Action Plan: [...] ; Action Decision: ...``."""
    decision = autoui_decision(rng, action_type)
    plan = ",".join(rng.choice(ACTION_TYPES) for _ in range(rng.randint(1, 5)))
    return f"Action Plan: [{plan}] ; Action Decision: {decision}"


def autoui_prompt(task: str, previous_decision: str | None) -> str:
    """DigiRL's autoui_prepare_prompt: the last action (decision part) and the goal."""
    prompt = "Previous Actions: "
    if previous_decision is not None:
        prompt += f"{previous_decision} "
    return prompt + f"Goal: {task}</s>"


def add_trajectory_reward(trajectory: list[dict[str, Any]]) -> None:
    total = np.sum([d["reward"] for d in trajectory])  # a numpy scalar, as in DigiRL
    for d in trajectory:
        d["trajectory_reward"] = total


def add_mc_return(trajectory: list[dict[str, Any]], gamma: float = 0.95) -> None:
    """DigiRL's add_mc_return (numpy float64 scalars)."""
    rewards = np.array([d["reward"] for d in trajectory]).reshape(1, -1)
    gamma_row = np.cumprod(np.ones((1, rewards.shape[1])) * gamma)
    gamma_matrix = np.triu(gamma_row.reshape(1, -1) / gamma_row.reshape(-1, 1))
    for d, mc in zip(trajectory, np.sum(rewards * gamma_matrix, axis=1)):
        d["mc_return"] = mc


def _features(rng: np.random.Generator, shape: tuple[int, ...], arrays: Arrays) -> Any:
    values = rng.standard_normal(shape).astype(np.float32)
    if arrays == "torch":
        import torch

        return torch.from_numpy(values)
    return values


def official_trajectories(
    screenshots: list[Path],
    n_trajectories: int,
    *,
    lengths: list[int] | None = None,
    seed: int = 0,
    arrays: Arrays = "numpy",
    image_dim: int = 1408,
    candidates: int = 0,
    rep_dim: int = 0,
    rep_list: bool = True,
    ids: bool = True,
    success_every: int = 2,
) -> list[list[dict[str, Any]]]:
    """Official-format trajectories over ``screenshots`` (a trajectory of L steps uses L + 1 of them).

    ``arrays``: image_features as numpy (DigiRL release), torch tensors, or None (no critic features).
    ``candidates``: K > 0 adds Digi-Q's action_list; ``rep_dim`` > 0 adds q_rep_out and, with ``rep_list``,
    q_rep_out_list [K, rep_dim] (q_rep_out = its row 0).
    Every ``success_every``-th trajectory ends with reward 1.
    """
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    lengths = lengths or [rng.randint(1, 6) for _ in range(n_trajectories)]
    needed = sum(length + 1 for length in lengths)
    if needed > len(screenshots):
        raise ValueError(f"need {needed} screenshots, got {len(screenshots)}")
    shots = iter(screenshots)
    trajectories = []
    for t, length in enumerate(lengths):
        task = rng.choice(TASKS)
        states = [next(shots) for _ in range(length + 1)]
        features = [_features(nrng, (image_dim,), arrays) for _ in states] if arrays else None
        success = t % success_every == 0
        previous = None
        trajectory = []
        for s in range(length):
            last = s == length - 1
            action = autoui_action(rng, "STATUS_TASK_COMPLETE" if last and success else None)
            decision = action.split("Action Decision: ", 1)[1]
            step: dict[str, Any] = {
                "observation": autoui_prompt(task, previous),
                "next_observation": autoui_prompt(task, decision),
                "image_features": features[s] if features else None,
                "image_path": f"{RECORDED_ROOT}/{states[s].name}",
                "next_image_path": f"{RECORDED_ROOT}/{states[s + 1].name}",
                "next_image_features": features[s + 1] if features else None,
                "task": task,
                "reward": 1 if last and success else 0,
                "done": last,
                "action": action,
            }
            if candidates:
                step["action_list"] = "<split>".join([action] + [autoui_action(rng) for _ in range(candidates - 1)])
            if candidates and rep_dim and rep_list:
                reps = nrng.standard_normal((candidates, rep_dim)).astype(np.float32)
                step["q_rep_out_list"] = reps
                step["q_rep_out"] = reps[0]
            elif rep_dim:
                step["q_rep_out"] = nrng.standard_normal(rep_dim).astype(np.float32)
            if ids:
                step["traj_id"], step["step_id"] = t, s
            trajectory.append(step)
            previous = decision
        add_trajectory_reward(trajectory)
        add_mc_return(trajectory)
        trajectories.append(trajectory)
    return trajectories


class _Numpy1Pickler(pickle._Pickler):  # the pure-Python pickler lets us rename globals
    """Writes numpy globals under numpy 1.x module names (numpy.core.*), as the 2024 releases have them."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            qualname = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"{module.replace('numpy._core', 'numpy.core', 1)}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _Numpy1PickleModule:
    Pickler = _Numpy1Pickler


def save_official(trajectories: Any, path: Path, *, numpy1_names: bool = False) -> Path:
    """``torch.save`` as the official code does (protocol 2); optionally with numpy 1.x global names."""
    import torch

    if numpy1_names:
        torch.save(trajectories, path, pickle_module=_Numpy1PickleModule)
    else:
        torch.save(trajectories, path)
    return path


# --------------------------------------------------------------------------- hostile files


class _SystemPayload:
    """Unpickling calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


class _ExecPayload:
    """Unpickling calls builtins.exec(source)."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (self.source,))


Hostile = Literal["os.system", "builtins.exec", "raw-pickle", "protocol-4", "hidden-in-step"]


def write_hostile(path: Path, marker: Path, how: Hostile) -> Path:
    """A file whose unpickling (with weights_only=False) creates ``marker``.

    os.system / builtins.exec: a torch.save file whose payload is the whole object; raw-pickle: a plain
    protocol-2 pickle (torch's legacy path); protocol-4: torch.save with STACK_GLOBAL opcodes;
    hidden-in-step: a valid-looking official trajectory with the payload in one step's field.
    """
    import torch

    shell = _SystemPayload(f"touch {marker}")
    python = _ExecPayload(f"open({str(marker)!r}, 'w').write('code ran')")
    if how == "os.system":
        torch.save([[{"observation": shell}]], path)
    elif how == "builtins.exec":
        torch.save([[{"observation": python}]], path)
    elif how == "raw-pickle":
        path.write_bytes(pickle.dumps([[{"observation": python}]], protocol=2))
    elif how == "protocol-4":
        torch.save([[{"observation": python}]], path, pickle_protocol=4)
    elif how == "hidden-in-step":
        shots = [Path(f"/nowhere/{i}.png") for i in range(8)]
        trajectories = official_trajectories(shots, 1, lengths=[3], arrays="numpy")
        trajectories[0][2]["task"] = shell
        torch.save(trajectories, path)
    else:
        raise ValueError(how)
    return path


