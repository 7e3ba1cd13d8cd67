"""Can the critic, or any linear read-out of f(s, a), tell a tap on the goal's element from a tap on another one?

Run from the repository root after `dvc repro` (it reads data/raw, data/candidates.parquet and models/critic):

    python docs/analysis/tap_probe.py data/embeddings/finetuned [more embedding folders …]

On click-button and click-link a stored state's tap candidates are labelled by the DOM: *right* when the innermost
element under the tap carries the goal's quoted text. The measure is the within-state pairwise accuracy

    P(score(right tap) > score(wrong tap))   over (right, wrong) pairs of one state (ties count ½; chance 0.5)

with wrong = any other tap, or only taps on another element of the right one's tag (another button or link: the
choice that needs the goal to be read). It is measured for the critic's Q (its own training and held-out
trajectories) and for a logistic-regression probe on f(s, a) trained on the labels directly, per embedding folder,
on a trajectory split (80/20) the probe never trained on. The no_vlm variant cannot see the goal, so its probe is
a goal-blind control.

    python docs/analysis/tap_probe.py --dom-text models/finetuned

recomputes f(s, a) of the same candidates with that checkpoint (params.yaml's embed layer and pooling), once with the
prompt as the embed stage writes it and once with the tapped element's DOM text in the action
(``tap (y=…, x=…) on "Submit"``), and probes both: does naming the element let the features match it to the goal?

    python docs/analysis/tap_probe.py --layers models/finetuned

recomputes them with the checkpoint's own prompts (naming the tapped control when its config says so) at each of its
layers ≥ 1, with last-token and mean pooling, and probes each: where to read f(s, a) (``embed.layer``,
``embed.pooling``). Results and their reading: docs/results.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import defaultdict
from typing import Any

import duckdb
import numpy as np
from sklearn.linear_model import LogisticRegression

from digiq.actions import parse_action
from digiq.envs.behavior import tapped_element

TASKS = ("click-button", "click-link")
Key = tuple[str, int, int]  # traj_id, step_id, cand_idx


def probe_holdout(traj_id: str) -> bool:
    return int(hashlib.sha256(traj_id.encode()).hexdigest(), 16) % 5 == 0


def tap_labels(con: duckdb.DuckDBPyConnection) -> dict[Key, dict[str, Any]]:
    """task, right (bool), tag of the tapped element and the critic's Q of every distinct tap candidate."""
    steps = con.sql(f"select traj_id, step_id, task, goal, elements from 'data/raw/steps/**/*.parquet' where task in {TASKS}")
    states = {(t, s): (task, re.findall(r'"([^"]+)"', goal)[0].strip(), json.loads(el)) for t, s, task, goal, el in steps.fetchall()}
    candidates = con.sql("select c.traj_id, c.step_id, c.cand_idx, c.action, s.q from 'data/candidates.parquet' c "
                         "join 'models/critic/candidate_scores.parquet' s using (traj_id, step_id, cand_idx) "
                         "qualify row_number() over (partition by c.traj_id, c.step_id, c.action order by c.cand_idx) = 1")
    labels = {}
    for t, s, k, action, q in candidates.fetchall():
        if (t, s) not in states or (a := parse_action(action)).kind != "tap":
            continue
        task, target, elements = states[(t, s)]
        hit = tapped_element(a.touch_point, elements)
        labels[(t, s, k)] = {"task": task, "right": hit is not None and (hit.get("text") or "").strip() == target,
                             "tag": hit["tag"] if hit else None, "q": q}
    return labels


def pairwise_accuracy(labels: dict[Key, dict[str, Any]], score: dict[Key, float], same_tag: bool) -> tuple[int, float]:
    """(states with a right and a wrong tap, P(score right > score wrong) pooled over their pairs)."""
    by_state: dict[tuple[str, int], list[Key]] = defaultdict(list)
    for key in score:
        by_state[key[:2]].append(key)
    states, pairs, wins = 0, 0, 0.0
    for keys in by_state.values():
        right = [score[k] for k in keys if labels[k]["right"]]
        tags = {labels[k]["tag"] for k in keys if labels[k]["right"]}
        wrong = [score[k] for k in keys if not labels[k]["right"] and (not same_tag or labels[k]["tag"] in tags)]
        if right and wrong:
            states += 1
            pairs += len(right) * len(wrong)
            wins += sum(float(r > w) + 0.5 * float(r == w) for r in right for w in wrong)
    return states, wins / max(pairs, 1)


def print_rows(name: str, labels: dict[Key, dict[str, Any]], score: dict[Key, float]) -> None:
    for task in TASKS:
        mine = {k: v for k, v in score.items() if labels[k]["task"] == task}
        cells = [f"{'same-tag' if same else 'any'} wrong: %d states, %.3f" % pairwise_accuracy(labels, mine, same)
                 for same in (False, True)]
        print(f"{name:45s} {task:13s} " + " | ".join(cells))


def stored_features(con: duckdb.DuckDBPyConnection, labels: dict[Key, dict[str, Any]], folder: str) -> dict[Key, np.ndarray]:
    rows = con.sql(f"select traj_id, step_id, cand_idx, embedding from '{folder}/candidates.parquet'").fetchall()
    return {tuple(r[:3]): np.asarray(r[3], np.float32) for r in rows if tuple(r[:3]) in labels}


def recomputed_features(con: duckdb.DuckDBPyConnection, labels: dict[Key, dict[str, Any]], model: str,
                        dom_text: bool | None, layers: list[int] | None = None,
                        poolings: tuple[str, ...] = ()) -> dict[tuple[int, str], dict[Key, np.ndarray]]:
    """f(s, a) of the labelled candidates from ``model``, {(layer, pooling): features}: at params.yaml's embed layer
    and pooling unless ``layers``/``poolings`` are given. The tapped element's text is in the action prompt when
    ``dom_text``; ``dom_text=None`` leaves what the prompts read off the page to the checkpoint (``VLM.reading``)."""
    import torch
    import yaml

    from digiq.store import Dataset
    from digiq.vlm import load_vlm

    embed = yaml.safe_load(open("params.yaml"))["embed"]
    layers, poolings = layers or [embed["layer"]], poolings or (embed["pooling"],)
    vlm, dataset = load_vlm(model), Dataset("data/raw")
    actions = {tuple(r[:3]): r[3] for r in con.sql("select traj_id, step_id, cand_idx, action from 'data/candidates.parquet'").fetchall()}
    by_state: dict[tuple[str, int], list[Key]] = defaultdict(list)
    for key in labels:
        by_state[key[:2]].append(key)
    steps = con.sql("select traj_id, step_id, goal, observation, screenshot, screenshot_sha256, elements "
                    f"from 'data/raw/steps/**/*.parquet' where task in {TASKS}").fetchall()
    out: dict[tuple[int, str], dict[Key, np.ndarray]] = defaultdict(dict)
    for traj_id, step_id, goal, observation, screenshot, sha, elements in steps:
        if not (keys := by_state.get((traj_id, step_id))):
            continue
        taps = [parse_action(actions[k]) for k in keys]
        page = json.loads(elements)
        targets = vlm.reading.targets(taps, page) if dom_text is None else [
            element_text(a, page) if dom_text else None for a in taps]
        observed = vlm.reading.observation(observation, page) if dom_text is None else observation
        image = dataset.load_image(screenshot, sha)
        tokens = vlm.encode_images([image])
        for pooling in poolings:
            with torch.inference_mode():
                f = vlm.candidate_features(image, goal, observed, taps, targets, layers=layers, pooling=pooling,
                                           image_tokens=tokens)
            for layer, values in f.features.items():
                out[(layer, pooling)].update(zip(keys, values.float().cpu().numpy()))
    return out


def element_text(tap: Any, elements: list[dict[str, Any]]) -> str | None:
    hit = tapped_element(tap.touch_point, elements)
    return ((hit or {}).get("text") or "").strip()[:40] or None


def linear_probe(labels: dict[Key, dict[str, Any]], features: dict[Key, np.ndarray]) -> dict[Key, float]:
    """Held-out probabilities of a logistic regression on standardised f(s, a), trained on the other trajectories."""
    keys = list(features)
    x = np.stack([features[k] for k in keys])
    y = np.asarray([labels[k]["right"] for k in keys])
    held = np.asarray([probe_holdout(k[0]) for k in keys])
    mean, std = x[~held].mean(0), x[~held].std(0) + 1e-6
    model = LogisticRegression(max_iter=2000).fit((x[~held] - mean) / std, y[~held])
    p = model.predict_proba((x[held] - mean) / std)[:, 1]
    return {k: float(v) for k, v in zip([k for k, h in zip(keys, held) if h], p)}


def main(args: list[str]) -> None:
    con = duckdb.connect()
    labels = tap_labels(con)
    if args[:1] == ["--dom-text"]:
        for dom_text in (False, True):
            features = next(iter(recomputed_features(con, labels, args[1], dom_text).values()))
            name = f"probe on {args[1]}, {'DOM text in the action' if dom_text else 'action as embedded'}"
            print_rows(name, labels, linear_probe(labels, features))
        return
    if args[:1] == ["--layers"]:
        from digiq.vlm.load import model_info

        depth = model_info(args[1])["text"]["num_hidden_layers"]
        features = recomputed_features(con, labels, args[1], None, list(range(1, depth + 1)), ("last", "mean"))
        for (layer, pooling), values in sorted(features.items(), key=lambda item: (item[0][1], item[0][0])):
            print_rows(f"probe on {args[1]}, layer {layer}, {pooling}", labels, linear_probe(labels, values))
        return
    critic_val = {t for (t,) in con.sql("select distinct traj_id from 'models/critic/step_scores.parquet' where split = 'val'").fetchall()}
    q = {k: v["q"] for k, v in labels.items()}
    print_rows("critic Q, its training trajectories", labels, {k: s for k, s in q.items() if k[0] not in critic_val})
    print_rows("critic Q, its held-out trajectories", labels, {k: s for k, s in q.items() if k[0] in critic_val})
    for folder in args:
        print_rows(f"probe on {folder}, held out", labels, linear_probe(labels, stored_features(con, labels, folder)))


if __name__ == "__main__":
    main(sys.argv[1:])
