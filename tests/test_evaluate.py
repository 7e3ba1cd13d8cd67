"""`digiq evaluate`: Wilson intervals, McNemar tests and their power, the same draws for every method, seed
disjointness, protocols, shards and resume, and real episodes in Chromium."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from digiq.config import Params
from digiq.params_file import load_params
from digiq.envs.behavior import IMPATIENT, BehaviorPolicy, scores_with
from digiq.envs.view import StepView
from digiq.errors import DigiqError
from digiq.eval_runner import Evaluation, check, collect_seeds
from digiq.evaluate import (EvalPolicy, EvaluateParams, candidate_set, episodes_for_power, inverse_cdf, mcnemar_p,
                            mcnemar_power, paired_comparison, planned_episodes_per_task, step_rng, success_summary,
                            wilson_interval)
from digiq.pipelines import evaluate as stage


# ---------------------------------------------------------------------------------------------- Wilson


def test_wilson_interval_matches_hand_computed_values():
    # 8 of 10, z = 1.96: c = (0.8 + 0.19208) / 1.38416 = 0.716737…, h = 1.96/1.38416·sqrt(0.016 + 0.0096040) = 0.226562…
    low, high = wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(0.490156, abs=1e-5)
    assert high == pytest.approx(0.943318, abs=1e-5)
    # 0 of 20: [0, z²/(n + z²)] = [0, 3.8416 / 23.8416]
    assert wilson_interval(0, 20, z=1.96) == pytest.approx((0.0, 3.8416 / 23.8416), abs=1e-9)
    # n of n mirrors 0 of n
    assert wilson_interval(20, 20, z=1.96) == pytest.approx((1 - 3.8416 / 23.8416, 1.0), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(DigiqError):
        wilson_interval(3, 2)


def test_success_summary_counts_and_interval():
    eps = [{"task": "t", "success": s, "steps": n, "timed_out": False, "terminated": True}
           for s, n in [(True, 2), (False, 4), (True, 3), (False, 8)]]
    s = success_summary(eps)
    assert (s["episodes"], s["successes"], s["success"], s["mean_steps"]) == (4, 2, 0.5, 4.25)
    low, high = wilson_interval(2, 4)
    assert s["ci95"] == [round(low, 4), round(high, 4)]


# ---------------------------------------------------------------------------------------------- choosers


def _view() -> StepView:
    elements = [{"ref": 1, "parent": 0, "tag": "button", "text": "Submit", "value": None, "id": "subbtn", "classes": "",
                 "bbox": [0.4, 0.3, 0.5, 0.6], "focused": False, "tampered": False, "leaf": True},
                {"ref": 2, "parent": 0, "tag": "button", "text": "Cancel", "value": None, "id": "", "classes": "",
                 "bbox": [0.6, 0.3, 0.7, 0.6], "focused": False, "tampered": False, "leaf": True}]
    return StepView.live("click-button", 'Click on the "Submit" button.', elements, [], 1)


def test_candidates_are_distinct_and_choices_reproducible():
    view = _view()
    cands, draws = candidate_set(BehaviorPolicy(noise=0.3), view, 16, np.random.default_rng(3))
    assert 1 <= len(cands) <= 16 and len(draws) == len(cands) and sum(draws) == 16 and min(draws) >= 1
    assert len({c.model_dump_json() for c in cands}) == len(cands)
    for method, protocol in (("behavior", "sample"), ("behavior-mode", "greedy"), ("random", "sample")):
        a, b = EvalPolicy(method, 16, 0.3, protocol), EvalPolicy(method, 16, 0.3, protocol)
        a.reset(7), b.reset(7)
        assert [a.act(view) for _ in range(5)] == [b.act(view) for _ in range(5)]
    # π_β's sample: candidate k with probability n_k / K, drawn at the step's uniform u (inverse CDF)
    p = EvalPolicy("behavior", 16, 0.3, "sample")
    p.reset(11)
    drawn, counts = candidate_set(BehaviorPolicy(noise=0.3), view, 16, step_rng(11, 0, "candidates"))
    assert p.act(view) == drawn[inverse_cdf(counts, step_rng(11, 0, "choice").random())]
    assert p.choose(view, cands, [1, 3, 2], u=0.0) == 0 and p.choose(view, cands, [1, 3, 2], u=0.25) == 1
    assert p.choose(view, cands, [1, 3, 2], u=0.99) == 2  # cumulative 1/6, 4/6, 6/6
    # behavior-mode: the most-drawn candidate, the first-drawn among equals
    mode = EvalPolicy("behavior-mode", 16, 0.3, "greedy")
    assert mode.choose(view, cands, [1, 3, 2]) == 1 and mode.choose(view, cands, [2, 1, 2]) == 0
    # baselines belong to one protocol each
    for method, wrong in (("behavior", "greedy"), ("random", "greedy"), ("behavior-mode", "sample")):
        with pytest.raises(DigiqError, match="protocol"):
            EvalPolicy(method, 16, 0.3, wrong)


def test_every_method_sees_the_same_candidates_at_the_same_step():
    """Candidate draws come from a generator of (episode seed, step) alone: whichever method acts, and whatever it
    chose or drew before, the candidates of step t of seed σ are the same; the chooser's uniform is another stream."""
    view, behavior = _view(), BehaviorPolicy(noise=0.3)
    proposed: dict[str, list] = {}
    for method, protocol in (("behavior", "sample"), ("random", "sample"), ("behavior-mode", "greedy")):
        policy = EvalPolicy(method, 16, 0.3, protocol)
        seen = []
        policy.choose = lambda v, c, d, u=0.0, seen=seen, policy=policy: seen.append((c, d)) or 0
        for seed in (5, 6):
            policy.reset(seed)
            for _ in range(3):
                policy.act(view)
        proposed[method] = seen
    assert proposed["behavior"] == proposed["random"] == proposed["behavior-mode"]
    expected = [candidate_set(behavior, view, 16, step_rng(seed, t, "candidates")) for seed in (5, 6) for t in range(3)]
    assert proposed["behavior"] == [(list(c), list(d)) for c, d in expected]
    # a generator of (seed, step, stream) only: the same numbers on every call, other numbers at another step/stream
    first = step_rng(5, 0, "candidates").random(4).tolist()
    assert first == step_rng(5, 0, "candidates").random(4).tolist()
    assert first != step_rng(5, 1, "candidates").random(4).tolist() != step_rng(5, 0, "choice").random(4).tolist()


def test_sampled_actor_draws_from_its_softmax_at_the_shared_uniform():
    import torch

    class Scores:  # a trained chooser with fixed logits g = log(1, 2, 1) (no prior): π = (¼, ½, ¼)
        def logits(self, s, cand_sa, mask, count):
            return torch.tensor([[0.0, math.log(2.0), 0.0]])

    class Features:
        def __call__(self, view, actions, inputs=None):
            return torch.zeros(1, 2), torch.zeros(1, len(actions), 2)

        def reset(self):
            pass

    sampled = EvalPolicy("digiq", 16, 0.3, "sample", featurizer=Features(), actor=Scores())
    greedy = EvalPolicy("digiq", 16, 0.3, "greedy", featurizer=Features(), actor=Scores())
    cands = ["a", "b", "c"]
    assert [sampled.choose(None, cands, [1, 1, 1], u) for u in (0.1, 0.3, 0.7, 0.8)] == [0, 1, 1, 2]
    assert {greedy.choose(None, cands, [1, 1, 1], u) for u in (0.1, 0.8)} == {1}


# ---------------------------------------------------------------------------------------------- paired tests


def test_mcnemar_exact_test_matches_the_hand_computed_binomial_tail():
    # b = 1, c = 9: p = 2 · P(X ≤ 1 | n = 10, ½) = 2 · (1 + 10) / 1024
    assert mcnemar_p(1, 9) == pytest.approx(0.021484375, abs=1e-12) == mcnemar_p(9, 1)
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32) and mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0
    with pytest.raises(DigiqError):
        mcnemar_p(-1, 2)


def test_paired_comparison_pairs_episodes_by_task_and_seed():
    def eps(outcomes):
        return [{"task": t, "seed": s, "success": w} for (t, s), w in outcomes.items()]

    mine = eps({("a", 1): True, ("a", 2): True, ("b", 1): False, ("b", 2): True, ("b", 3): True})
    theirs = eps({("b", 2): False, ("b", 1): True, ("a", 2): True, ("a", 1): False, ("c", 9): True})  # other order
    assert paired_comparison(mine, theirs) == {"n": 4, "b": 2, "c": 1, "p": 1.0, "difference": 0.25}


def test_power_of_mcnemars_test_and_the_episodes_it_asks_for():
    # n = 1 pair, 0 < α: one discordant pair never reaches p < 0.05, so the power is 0
    assert mcnemar_power(1, 0.3, 0.1) == 0.0
    # n = 6, p10 = 1: all six pairs favour the reference, p = 2 / 64 < 0.05 → power 1; five give 2/32 = 0.0625 → 0
    assert mcnemar_power(6, 1.0, 0.0) == pytest.approx(1.0) and mcnemar_power(5, 1.0, 0.0) == 0.0
    n = episodes_for_power(0.2, 0.1)
    assert mcnemar_power(n, 0.2, 0.1) >= 0.8 > mcnemar_power(n - 1, 0.2, 0.1)
    # the defaults are the planned effects' episodes over the 8 default tasks
    assert EvaluateParams().episodes_per_task == planned_episodes_per_task(len(Params().collect.tasks))


def test_critic_greedy_picks_the_highest_advantage_among_valid_candidates():
    import torch

    from digiq.config import CriticParams
    from digiq.critic import DoubleCritic, advantage
    from digiq.evaluate import CriticGreedy

    torch.manual_seed(0)
    critic = DoubleCritic(3, 4, CriticParams(hidden=[8]))
    s, cand_sa = torch.randn(1, 3), torch.randn(1, 5, 4)
    order = advantage(critic, s, cand_sa)[0].argsort(descending=True).tolist()
    greedy = CriticGreedy(critic)
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert greedy.act(s, cand_sa, mask, None).tolist() == [order[0]]
    mask[0, order[0]] = False  # an invalid candidate is never chosen, however high its score
    assert greedy.act(s, cand_sa, mask, None).tolist() == [order[1]]
    same = cand_sa[:, :1].expand(1, 5, 4)  # equal advantages: the first-drawn candidate
    assert greedy.act(s, same, torch.ones(1, 5, dtype=torch.bool), None).tolist() == [0]


# ---------------------------------------------------------------------------------------------- config, seeds, shards


def _params(tmp_path: Path, collect: dict | None = None, base: Path | None = None, k: int = 8, **evaluate) -> Params:
    """Two baselines on click-button (sample protocol; greedy adds behavior-mode), two episodes each, one per shard,
    K = 8 candidates, beside a 60-episode collection at seed 0; trained methods see the off-the-shelf features of
    the VLM in ``base``."""
    values = dict(methods=["behavior", "random"], tasks=["click-button"], episodes_per_task=2, seed=1000, workers=2,
                  episodes_per_unit=1, shards=str(tmp_path / "shards"), out=str(tmp_path / "metrics/eval.json"),
                  plots=str(tmp_path / "plots/eval.csv"), actors=str(tmp_path / "actors"))
    values.update(evaluate)
    col = {"seed": 0, "tasks": ["click-button"], "episodes_per_task": 60, "noise": 0.3, "max_steps": 4, **(collect or {})}
    served = {"features": {"variant": "off_the_shelf"}, "embed": {"models": {"off_the_shelf": str(base)}}} if base else {}
    return Params.model_validate({"collect": col, "evaluate": values, "candidates": {"k": k}, **served})


def _evaluation(tmp_path: Path, collect: dict | None = None, **evaluate) -> Evaluation:
    return Evaluation.of(_params(tmp_path, collect, **evaluate))


def test_evaluation_seeds_must_be_disjoint_from_collection(tmp_path):
    with pytest.raises(DigiqError, match="evaluate.seed"):
        check(_evaluation(tmp_path, seed=0))
    check(_evaluation(tmp_path))
    assert not collect_seeds(0, ["click-button"], 60) & collect_seeds(1000, ["click-button"], 2)


def test_missing_trained_policy_is_one_clear_error(tmp_path):
    with pytest.raises(DigiqError, match="no trained actor for method 'digiq'") as err:
        check(_evaluation(tmp_path, methods=["digiq", "behavior"]))
    assert "actors/digiq" in str(err.value)
    with pytest.raises(DigiqError, match="no trained critic for method 'critic-greedy'") as err:
        check(_evaluation(tmp_path, methods=["critic-greedy"], critic=str(tmp_path / "critic")))
    assert str(tmp_path / "critic") in str(err.value)


def test_methods_are_given_once_each(tmp_path):
    for methods, why in (([], "no methods given"), (["random", "random"], "methods repeat")):
        with pytest.raises(DigiqError, match=f"evaluate.methods: .*{why}"):
            load_params(tmp_path / "absent.yaml", [f"evaluate.methods={methods}".replace("'", "")])


def test_null_settings_take_the_collect_defaults():
    evaluation, p = Evaluation.of(Params()), Params()
    ev = evaluation.settings
    assert evaluation.tasks == p.collect.tasks and ev.noise == p.collect.noise and ev.max_steps == p.collect.max_steps
    assert evaluation.collect.behavior == IMPATIENT  # the π_β that collected the data proposes the candidates
    spec = evaluation.policy_spec("behavior-mode", "greedy")
    assert spec.build().behavior.scores == scores_with(IMPATIENT) != BehaviorPolicy().scores  # as the workers build it
    assert ev.seed != p.collect.seed
    assert evaluation.k == p.candidates.k  # live K is offline K: one declaration, candidates.k
    assert "k" not in EvaluateParams.model_fields
    # live features are the embed stage's recipe for the variant the policies were trained on
    assert evaluation.features == {"variant": p.features.variant, "model": p.embed.models[p.features.variant],
                                   "layer": p.embed.layer, "pooling": p.embed.pooling, "dtype": p.embed.dtype,
                                   "quantize": p.embed.quantize, "device": p.embed.device,
                                   "channels": {"model": p.channels.model, "encoder": p.channels.encoder,
                                                "dtype": p.channels.dtype, "batch_size": p.channels.batch_size}}
    assert evaluation.policy_spec("digiq", "sample").kwargs["features"] == evaluation.features
    assert evaluation.policy_spec("digiq", "sample").kwargs["protocol"] == "sample"


def test_live_observation_quotes_as_many_actions_as_the_data(tmp_path):
    # the policies were trained on observations with collect.history previous actions: live ones must match
    short, longer = _evaluation(tmp_path), _evaluation(tmp_path, collect={"history": 8})
    runs = [("sample", "behavior")]
    assert (short.run_config(runs, None).history, longer.run_config(runs, None).history) == (1, 8)
    assert short.fingerprint("behavior", "sample") != longer.fingerprint("behavior", "sample")


def _fake_shards(evaluation: Evaluation, successes: dict[tuple[str, str], list[bool]]) -> None:
    """Write finished shards by hand (the format run() writes) for (protocol, method), so summarising needs no
    browser; episode i has seed 100 + i."""
    for (protocol, method), wins in successes.items():
        fp = evaluation.fingerprint(method, protocol)
        for unit in evaluation.units(protocol):
            eps = [{"task": unit.task, "index": i, "seed": 100 + i, "steps": 3, "success": wins[i], "raw_reward": float(wins[i]),
                    "terminated": True, "timed_out": False, "failed_steps": 0, "retries": 0} for i in unit.indices]
            path = evaluation.shard_path(method, protocol, unit, fp)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"method": method, "protocol": protocol, "task": unit.task, "fingerprint": fp,
                                        "episodes": eps}))


SAMPLE_GREEDY = {("sample", "behavior"): [True, False], ("sample", "random"): [False, False],
                 ("greedy", "behavior-mode"): [True, True]}


def test_resume_skips_finished_shards(tmp_path):
    params = _params(tmp_path)
    evaluation = Evaluation.of(params)
    _fake_shards(evaluation, SAMPLE_GREEDY)
    stamps = {p: p.stat().st_mtime_ns for p in Path(params.evaluate.shards).rglob("*.json")}
    metrics = stage.run(params)  # everything is on disk: no browser starts, nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in Path(params.evaluate.shards).rglob("*.json")} == stamps
    assert metrics["timing"]["this_run"] == {}
    sample = metrics["protocols"]["sample"]["methods"]
    assert sample["behavior"]["successes"] == 1 and sample["random"]["successes"] == 0
    assert Path(params.evaluate.plots).read_text().splitlines() == [
        "protocol,method,task,success,ci_low,ci_high,episodes",
        "sample,behavior,click-button,0.5,0.0945,0.9055,2", "sample,behavior,all,0.5,0.0945,0.9055,2",
        "sample,random,click-button,0.0,0.0,0.6576,2", "sample,random,all,0.0,0.0,0.6576,2",
        "greedy,behavior-mode,click-button,1.0,0.3424,1.0,2", "greedy,behavior-mode,all,1.0,0.3424,1.0,2"]
    # another K (candidates.k), or another π_β, changes the episodes: the old shards no longer count
    assert _evaluation(tmp_path, k=4).fingerprint("behavior", "sample") != evaluation.fingerprint("behavior", "sample")
    assert (_evaluation(tmp_path, collect={"behavior": {}}).fingerprint("behavior", "sample")
            != evaluation.fingerprint("behavior", "sample"))


def test_the_protocol_is_in_every_shard_fingerprint_and_name(tmp_path):
    evaluation = _evaluation(tmp_path)
    unit = evaluation.units("sample")[0]
    sample, greedy = evaluation.fingerprint("random", "sample"), evaluation.fingerprint("random", "greedy")
    assert sample != greedy
    assert evaluation.shard_path("random", "sample", unit, sample).name.startswith("sample.click-button.e00000-00000.")
    assert evaluation.shard_path("random", "sample", unit, sample) != evaluation.shard_path("random", "greedy", unit, greedy)
    # the shards of one protocol are resumed when only the other protocol's episode count changes
    more = _evaluation(tmp_path, episodes_per_task={"sample": 2, "greedy": 5})
    assert more.fingerprint("random", "sample") == sample and len(more.units("greedy")) == 5


def test_protocol_tables_hold_their_methods():
    ev = EvaluateParams(methods=["digiq", "bc", "critic-greedy", "behavior", "random"])
    assert ev.methods_of("sample") == ["digiq", "bc", "behavior", "random"]
    assert ev.methods_of("greedy") == ["digiq", "bc", "critic-greedy", "behavior-mode"]  # the bar, always
    assert EvaluateParams(episodes_per_task=7).episodes_per_task == {"sample": 7, "greedy": 7}
    with pytest.raises(ValueError, match="episodes_per_task"):
        EvaluateParams(protocols=["sample", "greedy"], episodes_per_task={"sample": 3})


def test_a_method_of_no_chosen_protocol_is_refused(tmp_path):
    with pytest.raises(DigiqError, match="belong to no protocol"):
        check(_evaluation(tmp_path, methods=["behavior-mode", "random"], protocols=["sample"]))


def test_eval_json_holds_both_protocols_and_the_paired_tests(tmp_path):
    params = _params(tmp_path, methods=["behavior", "random"], reference="behavior", episodes_per_task=4)
    wins = {("sample", "behavior"): [True, True, True, False], ("sample", "random"): [False, True, False, True],
            ("greedy", "behavior-mode"): [True, False, True, True]}
    _fake_shards(Evaluation.of(params), wins)
    stage.run(params)
    data = json.loads(Path(params.evaluate.out).read_text())
    assert set(data) >= {"protocols", "tasks", "seed", "k", "noise", "timing"} and data["k"] == 8
    assert set(data["protocols"]) == {"sample", "greedy"}
    sample, greedy = data["protocols"]["sample"], data["protocols"]["greedy"]
    assert (sample["episodes_per_task"], greedy["bar"], list(greedy["methods"])) == (4, "behavior-mode", ["behavior-mode"])
    assert sample["methods"]["behavior"]["successes"] == 3 and sample["methods"]["behavior"]["per_task"]["click-button"]["episodes"] == 4
    # behavior against random, paired by seed: only behavior 1st and 3rd (b = 2), only random the 4th (c = 1)
    paired = sample["paired"]
    assert paired["reference"] == "behavior" and set(paired["against"]) == {"random"}
    random = paired["against"]["random"]
    assert {k: random[k] for k in ("n", "b", "c", "difference")} == {"n": 4, "b": 2, "c": 1, "difference": 0.25}
    assert random["p"] == pytest.approx(mcnemar_p(2, 1)) == 1.0
    assert random["per_task"]["click-button"]["b"] == 2
    assert greedy["paired"]["against"] == {}  # the reference is not in the greedy table


# ---------------------------------------------------------------------------------------------- real browser


@pytest.mark.browser
def test_behavior_and_random_in_a_real_browser(tmp_path):
    params = _params(tmp_path)
    evaluation, cfg = Evaluation.of(params), params.evaluate
    metrics = stage.run(params)
    first = evaluation.shard_path("random", "sample", evaluation.units("sample")[0], evaluation.fingerprint("random", "sample"))
    assert first.exists()
    for episode in json.loads(first.read_text())["episodes"]:  # what each live episode did, readable
        assert "Click" in episode["goal"] and len(episode["actions"]) == episode["steps"]
        assert all(a.startswith(("tap (y=", "type ", "press ", "swipe ", "task complete")) for a in episode["actions"])
    data = json.loads(Path(cfg.out).read_text())
    assert data == json.loads(json.dumps(metrics))
    tables = {m: data["protocols"][p]["methods"][m] for p, m in (("sample", "behavior"), ("sample", "random"),
                                                                  ("greedy", "behavior-mode"))}
    for method, m in tables.items():
        assert m["episodes"] == 2 and m["per_task"]["click-button"]["episodes"] == 2
        low, high = wilson_interval(m["successes"], 2)
        assert m["ci95"] == [round(low, 4), round(high, 4)]
        assert 1 <= m["mean_steps"] <= params.collect.max_steps
        assert m["timed_out"] == 0
    rows = list(csv.DictReader(Path(cfg.plots).open()))
    assert {(r["method"], r["task"]) for r in rows} == {(m, t) for m in tables for t in ("click-button", "all")}
    assert all(math.isfinite(float(r["success"])) for r in rows)
    assert {p: set(t) for p, t in data["timing"]["this_run"].items()} == {"sample": {"behavior", "random"},
                                                                          "greedy": {"behavior-mode"}}
    # same seeds, same policies → identical episodes on a re-run from scratch
    first.unlink()
    again = stage.run(params)
    assert again["protocols"]["sample"]["methods"]["random"] == data["protocols"]["sample"]["methods"]["random"]
    assert again["timing"]["this_run"] == {"sample": {"random": again["timing"]["this_run"]["sample"]["random"]}}


@pytest.mark.browser
def test_methods_share_what_their_episodes_have_in_common_and_get_the_same_episodes(tmp_path):
    """evaluate.reuse: every method of a protocol plays a (task, seed) in turn in one browser and a page another
    method reached by the same actions is not played again; each episode is what playing it whole gives."""
    def run(reuse: bool) -> dict:
        folder = tmp_path / f"reuse-{reuse}"
        params = _params(folder, methods=["behavior", "random"], tasks=["click-checkboxes", "enter-text"],
                         episodes_per_task=4, episodes_per_unit=2, reuse=reuse)
        metrics = stage.run(params)
        episodes = {}
        for shard in sorted(Path(params.evaluate.shards).rglob("*.json")):
            data = json.loads(shard.read_text())
            for e in data["episodes"]:
                episodes[(data["protocol"], data["method"], e["task"], e["index"])] = e
        return {"episodes": episodes, "pool": metrics["timing"]["pool"], "tables": metrics["protocols"]}

    shared, whole = run(True), run(False)
    assert len(whole["episodes"]) == 3 * 2 * 4  # behavior and random (sample), behavior-mode (greedy)
    assert shared["episodes"] == whole["episodes"] and shared["tables"] == whole["tables"]
    assert whole["pool"]["pages"]["reused"] == 0 and whole["pool"]["pages"]["replayed"] == 0
    assert shared["pool"]["pages"]["reused"] >= 2 * 4  # at least random's first page of every sampled episode
    played = lambda pool: pool["pages"]["browser"] + pool["pages"]["replayed"]  # noqa: E731
    assert played(shared["pool"]) < played(whole["pool"])


def test_cli_refuses_collection_seeds_with_one_line(tmp_path):
    import typer
    from typer.testing import CliRunner

    from digiq.cli import evaluate as cli

    app = typer.Typer()
    cli.register(app)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["evaluate", "--seed", "0", "--methods", "behavior", "--tasks", "click-button",
                                      "--episodes", "1", "--params", str(tmp_path / "absent.yaml"), "--no-progress"])
    assert result.exit_code == 2
    assert "evaluate.seed: evaluation seed 0 reuses" in result.output
    assert not (tmp_path / "metrics").exists()


@pytest.mark.browser
@pytest.mark.slow
def test_trained_policy_acts_on_live_vlm_features(tmp_path, monkeypatch):
    """A CandidatePolicy (untrained weights, real checkpoint format) picks among live candidates scored from the
    real default VLM: the whole per-step path of a trained method, in a real browser."""
    import torch

    from digiq.actor import CandidatePolicy
    from digiq.critic import DoubleCritic
    from digiq.evaluate import build_eval_policy
    from digiq.pipelines.build_model import run as build_model

    monkeypatch.setenv("DIGIQ_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    build_model(Params(model={"base": str(base), "prompt_order": "image_first"}))
    width = json.loads((base / "config.json").read_text())["text_config"]["hidden_size"]
    from digiq.channels import Inputs
    from digiq.config import ActorParams, CriticParams

    vlm = Inputs(q=["vlm"], v=["vlm"])  # the VLM feature alone (channel composition: the channels' own live test)
    torch.manual_seed(0)
    CandidatePolicy(width, width, ActorParams(inputs=vlm), method="digiq").save_pretrained(tmp_path / "actors/digiq")
    metrics = stage.run(_params(tmp_path, base=base, methods=["digiq"], workers=1, episodes_per_unit=2, protocols=["sample"]))
    m = metrics["protocols"]["sample"]["methods"]["digiq"]
    assert m["episodes"] == 2 and m["timed_out"] == 0 and 1 <= m["mean_steps"] <= 4
    assert metrics["timing"]["this_run"]["sample"]["digiq"]["steps"] == 2 * m["mean_steps"]
    assert not (tmp_path / "shards/.features").exists()  # the run's shared live features are scratch
    # critic-greedy: the same live path, choosing with a saved critic
    DoubleCritic(width, width, CriticParams(inputs=vlm)).save_pretrained(tmp_path / "critic")
    params = _params(tmp_path, base=base, methods=["critic-greedy"], workers=1, episodes_per_unit=2, critic=str(tmp_path / "critic"))
    m = stage.run(params)["protocols"]["greedy"]["methods"]["critic-greedy"]
    assert m["episodes"] == 2 and m["timed_out"] == 0 and 1 <= m["mean_steps"] <= 4
    # a policy trained on other features is refused with one clear message
    CandidatePolicy(width + 1, width + 1, ActorParams(inputs=vlm)).save_pretrained(tmp_path / "actors/bc")
    with pytest.raises(DigiqError, match="features.variant"):
        build_eval_policy("bc", 4, 0.3, "greedy", actor_dir=str(tmp_path / "actors/bc"), features=Evaluation.of(params).features)


def test_cli_takes_overrides_and_everyday_flags(tmp_path):
    import typer
    import yaml
    from typer.testing import CliRunner

    from digiq.cli import evaluate as cli

    params = _params(tmp_path, k=4, protocols=["sample"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(include={"collect", "evaluate", "candidates"})))
    _fake_shards(Evaluation.of(params.model_copy(update={"candidates": params.candidates.model_copy(update={"k": 8})})),
                 {("sample", "behavior"): [True, True]})
    app = typer.Typer()
    cli.register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "elsewhere.json"
    result = CliRunner().invoke(app, ["evaluate", "--params", str(tmp_path / "params.yaml"), "-S", "candidates.k=8",
                                      "--methods", "behavior", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["protocols"]["sample"]["methods"]["behavior"]["successes"] == 2  # k=8's shards resumed
    assert "behavior" in result.output and f"wrote {out}, {params.evaluate.plots}" in result.output


def test_live_features_are_computed_once_per_state_and_shared_through_the_cache(tmp_path, monkeypatch):
    """Two featurizers (two workers, or two methods) with one cache folder: the second reads the first one's
    features of the same state and candidates, and computes only what differs."""
    import digiq.extractor
    from digiq.envs.behavior import BehaviorPolicy
    from digiq.live_features import LiveFeaturizer

    calls = []

    def fake_featurize(extractor, image, goal, observation, actions, elements=None):
        calls.append(len(actions))
        return np.full(3, float(len(calls)), np.float32), np.full((len(actions), 4), float(len(calls)), np.float32)

    monkeypatch.setattr(digiq.extractor, "featurize", fake_featurize)

    def featurizer() -> LiveFeaturizer:
        f = LiveFeaturizer.__new__(LiveFeaturizer)  # no VLM: featurize is faked
        f.extractor, f.recipe, f.cache, f.previous_screenshot = None, "recipe", tmp_path / "cache", None
        return f

    view = _view()
    view.screenshot = np.zeros((8, 8, 3), np.uint8)
    cands = candidate_set(BehaviorPolicy(noise=0.3), view, 8, step_rng(1, 0, "candidates"))[0]
    first, second = featurizer(), featurizer()
    s1, sa1 = first(view, cands)
    s2, sa2 = second(view, cands)
    assert calls == [len(cands)] and s1.shape == (1, 3) and sa1.shape == (1, len(cands), 4)
    assert s1.equal(s2) and sa1.equal(sa2)
    second(view, cands[:1])  # other candidates: computed
    view.screenshot = np.ones((8, 8, 3), np.uint8)
    second(view, cands)  # another screen: computed
    assert calls == [len(cands), 1, len(cands)]
    assert not list((tmp_path / "cache").glob("*.part.npz"))
