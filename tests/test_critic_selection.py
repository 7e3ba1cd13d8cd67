"""Which critic is kept: the held-out update (critic.select), the learning rate (critic.lrs), what config.json records,
resuming with both, and the per-task diagnostics — on hand-computed cases and the toy MDP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import toy_transitions
from digiq.channels import Inputs
from digiq.config import CriticParams
from digiq.critic import CriticTrainer, DoubleCritic, train_critic
from digiq.critic_checkpoint import BestPoint, CriticCheckpoint
from digiq.critic_diagnostics import per_task_diagnostics, ranking_quality, return_error, trajectory_task
from digiq.critic_grid import train_critic_grid
from digiq.errors import DigiqError
from digiq.transitions import Batch, Transitions

torch.set_num_threads(1)

TOY_RUN = {"gamma": 0.95, "seed": 0}  # toy_transitions' γ
VLM_ONLY = Inputs(q=["vlm"], v=["vlm"])
RUN = CriticParams(updates=400, hidden=[64, 64], log_every=25, lrs=[1e-3], device="cpu")


@pytest.fixture(scope="module")
def toy():
    return toy_transitions(200, seed=0), toy_transitions(60, seed=1)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def set_linear(head: nn.Sequential, weight: list[float]) -> None:
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([weight]))
        head[0].bias.zero_()


# ----------------------------------------------------------------------------------------------- hand-computed


def test_best_point_keeps_the_earliest_lowest_score_and_a_copy_of_the_weights():
    module, best = nn.Linear(1, 1), BestPoint()
    for step, score, weight in ((25, 3.0, 1.0), (50, 1.0, 2.0), (75, 2.0, 3.0), (100, 1.0, 4.0)):
        with torch.no_grad():
            module.weight.fill_(weight)
        best.offer(step, score, module)
    assert (best.step, best.score) == (50, 1.0)  # the tie at 100 does not replace it
    assert best.state["weight"].item() == 2.0 and module.weight.item() == 4.0  # a copy, not a view


def test_return_error_by_hand_in_the_diagnostics_and_in_the_trainer():
    critic = DoubleCritic(2, 2, CriticParams(hidden=[], standardize=False, lrs=[1e-3], device="cpu"), gamma=0.95)
    for head, weight in ((critic.online.q1, [1.0, 0.0]), (critic.online.q2, [0.0, 1.0]), (critic.online.v1, [1.0, 0.0]),
                         (critic.online.v2, [0.0, 0.0])):
        set_linear(head, weight)
    sa, s, g = torch.tensor([[1.0, 4.0], [3.0, 2.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.5])
    data = Transitions(s=s, sa=sa, s_next=s, reward=g, done=torch.ones(2), mc_return=g)
    # Q = max(Q1, Q2) = [4, 3], V = max(V1, V2) = [2, 0]:  ((4−1)² + (3−0.5)²)/2 = 7.625,  ((2−1)² + (0−0.5)²)/2 = 0.625
    assert return_error(critic, data) == pytest.approx({"q_return_mse": 7.625, "v_return_mse": 0.625, "return_mse": 8.25})
    batch = Batch(s, sa, s, g, torch.ones(2), g)
    assert CriticTrainer(critic).evaluate(batch)["val_return_mse"].item() == pytest.approx(8.25)


def test_per_task_ranking_and_behavior_agreement_by_hand():
    critic = DoubleCritic(1, 1, CriticParams(hidden=[], standardize=False, lrs=[1e-3], device="cpu"))
    for head in (critic.online.q1, critic.online.q2):
        set_linear(head, [1.0])  # Q(s, a) = the candidate's one feature
    cand = torch.tensor([[[2.0], [1.0], [3.0]], [[0.0], [5.0], [1.0]], [[4.0], [1.0], [1.0]]])
    counts = torch.tensor([[1.0, 3.0, 1.0], [2.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
    data = Transitions(s=torch.zeros(3, 1), sa=cand[:, 0], s_next=torch.zeros(3, 1), reward=torch.zeros(3), done=torch.ones(3),
                       mc_return=torch.zeros(3), cand_sa=cand, cand_count=counts, traj_success=torch.tensor([True, True, False]))
    out = per_task_diagnostics(critic, data, np.array(["a", "a", "b"], dtype=object))
    # a: ranking (½ + 0)/2 = ¼ (state 0 beats 1 of 2, state 1 none); critic's argmax [2, 1] vs π_β's mode [1, 0]: 0 of 2
    assert out["a"] == pytest.approx({"states": 2, "ranking_quality": 0.25, "ranking_states": 2, "argmax_is_behavior_mode_frac": 0.0,
                                      "argmax_draws_mean": 1.0, "behavior_mode_draws_mean": 2.5})
    # b: no successful trajectory (no ranking); argmax 0 (Q 4) vs mode 2 (2 draws)
    assert out["b"]["ranking_states"] == 0 and out["b"]["argmax_is_behavior_mode_frac"] == 0.0
    assert trajectory_task(np.array(["click-button.s0.e00012", "use-autocomplete.s3.e00000", "official/17"])).tolist() == [
        "click-button", "use-autocomplete", "unknown"]


# ----------------------------------------------------------------------------------------------- the kept update


def test_best_return_keeps_the_update_with_the_lowest_held_out_return_error(toy):
    data, val = toy
    critic, history = train_critic(data, RUN, val_data=val, **TOY_RUN)
    errors = [point["val_return_mse"] for point in history]
    step = int(history[int(np.argmin(errors))]["step"])  # argmin: the earliest on ties
    assert critic.config.selected_step == step and 25 < step < 400  # neither the first point nor the last
    assert critic.config.selected_return_mse == min(errors)
    assert critic.config.selected_val_loss == history[int(np.argmin(errors))]["val_loss"]
    # the kept weights are exactly those after `step` updates (same seed, same batches): online and target heads
    shorter, _ = train_critic(data, RUN.model_copy(update={"updates": step, "select": "last"}), val_data=val, **TOY_RUN)
    assert same_weights(critic, shorter)
    assert return_error(critic, val)["return_mse"] == pytest.approx(min(errors), rel=1e-5)


def test_best_td_keeps_a_barely_trained_critic_on_the_toy_mdp(toy):
    """Why best_return is the default: the held-out TD loss is lowest where the heads still agree with their own
    near-zero targets, the first logged point; that critic ranks held-out actions far worse."""
    data, val = toy
    by_td, history = train_critic(data, RUN.model_copy(update={"select": "best_td"}), val_data=val, **TOY_RUN)
    by_return, _ = train_critic(data, RUN, val_data=val, **TOY_RUN)
    assert by_td.config.selected_step == 25 == history[int(np.argmin([p["val_loss"] for p in history]))]["step"]
    # measured: 0.68 against 0.98
    assert ranking_quality(by_td, val)["ranking_quality"] < 0.75 < ranking_quality(by_return, val)["ranking_quality"]
    last, _ = train_critic(data, RUN.model_copy(update={"select": "last"}), val_data=val, **TOY_RUN)
    assert last.config.selected_step == 400 and last.config.selected_return_mse == history[-1]["val_return_mse"]


def test_without_held_out_data_every_rule_keeps_the_last_update(toy):
    data, _ = toy
    critic, history = train_critic(data, RUN.model_copy(update={"updates": 60}), **TOY_RUN)
    last, _ = train_critic(data, RUN.model_copy(update={"updates": 60, "select": "last"}), **TOY_RUN)
    assert critic.config.selected_step == 60 and critic.config.selected_return_mse is None and same_weights(critic, last)


# ----------------------------------------------------------------------------------------------- the learning rate


def test_lr_grid_keeps_the_rate_with_the_lowest_held_out_return_error(toy):
    data, val = toy
    params = RUN.model_copy(update={"lrs": [1e-6, 1e-3], "updates": 200})
    critic, history, grid = train_critic_grid(data, params, val_data=val, **TOY_RUN)
    assert [row["lr"] for row in grid] == [1e-6, 1e-3] and [row["chosen"] for row in grid] == [False, True]
    assert grid[1]["return_mse"] < grid[0]["return_mse"]  # 1e-6 barely moves the heads from their start
    alone, alone_history = train_critic(data, params, lr=1e-3, val_data=val, **TOY_RUN)
    assert critic.config.lr == 1e-3 and same_weights(critic, alone) and history == alone_history
    assert grid[1]["selected_step"] == alone.config.selected_step and grid[1]["return_mse"] == alone.config.selected_return_mse
    assert grid[1]["ranking_quality"] == ranking_quality(alone, val)["ranking_quality"]
    # a tie (the same rate twice) goes to the earlier entry
    _, _, tie = train_critic_grid(data, params.model_copy(update={"lrs": [1e-3, 1e-3], "updates": 50}), val_data=val, **TOY_RUN)
    assert [row["chosen"] for row in tie] == [True, False] and tie[0]["return_mse"] == tie[1]["return_mse"]


def test_several_rates_need_held_out_data(toy):
    data, _ = toy
    with pytest.raises(DigiqError, match="critic.lrs: choosing among 2 learning rates needs held-out trajectories"):
        train_critic_grid(data, RUN.model_copy(update={"lrs": [1e-3, 1e-4]}), **TOY_RUN)
    critic, _, grid = train_critic_grid(data, RUN.model_copy(update={"updates": 20}), **TOY_RUN)  # one rate: no choice to make
    assert grid == [{"lr": 1e-3, "selected_step": 20, "selected_val_loss": None, "return_mse": None, "ranking_quality": None,
                     "chosen": True}]


def test_a_grid_killed_in_its_second_run_resumes_there_and_ends_as_an_uninterrupted_one(toy, tmp_path, monkeypatch):
    """Killed at the 100th update of the second rate (last save at 50): the re-run does 150 updates, not 350, and
    keeps the same critic, history and grid."""
    data, val = toy
    params = RUN.model_copy(update={"lrs": [1e-3, 3e-4], "updates": 200})
    reference = train_critic_grid(data, params, val_data=val, **TOY_RUN)
    ckpt, update, calls = tmp_path / "critic.ckpt", CriticTrainer.update, []

    def counted(self, batch, stop_at=None):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return update(self, batch)

    monkeypatch.setattr(CriticTrainer, "update", lambda self, batch: counted(self, batch, stop_at=300))
    with pytest.raises(KeyboardInterrupt):
        train_critic_grid(data, params, val_data=val, checkpoint=ckpt, checkpoint_every=50, **TOY_RUN)
    assert sorted(CriticCheckpoint(ckpt).steps().values()) == [50, 200]  # the first run finished, the second at 50
    calls.clear()
    monkeypatch.setattr(CriticTrainer, "update", lambda self, batch: counted(self, batch))
    critic, history, grid = train_critic_grid(data, params, val_data=val, checkpoint=ckpt, checkpoint_every=50, **TOY_RUN)
    assert len(calls) == 150
    assert same_weights(critic, reference[0]) and history == reference[1] and grid == reference[2]
    assert critic.config == reference[0].config


# ----------------------------------------------------------------------------------------------- what config.json records


def test_config_records_inputs_select_rate_and_the_kept_update(toy, tmp_path):
    data, val = toy
    params = RUN.model_copy(update={"updates": 100, "inputs": VLM_ONLY})
    critic, _ = train_critic(data, params, lr=3e-4, val_data=val, **TOY_RUN)
    critic.save_pretrained(tmp_path / "c")
    saved = json.loads((tmp_path / "c" / "config.json").read_text())["config"]
    assert saved["inputs"] == {"q": ["vlm"], "v": ["vlm"]} and saved["select"] == "best_return" and saved["lr"] == 3e-4
    assert saved["selected_step"] == critic.config.selected_step and 0 < saved["selected_step"] <= 100
    assert saved["selected_return_mse"] == critic.config.selected_return_mse and saved["selected_val_loss"] > 0
    assert "lrs" not in saved  # the grid is the stage's (metrics/critic.json), not this critic's
    assert DoubleCritic.from_pretrained(tmp_path / "c").config == critic.config


def test_a_critic_saved_before_inputs_and_select_loads_as_vlm_only_keeping_its_last_update(toy, tmp_path):
    data, _ = toy
    critic, _ = train_critic(data, RUN.model_copy(update={"updates": 20, "inputs": VLM_ONLY}), **TOY_RUN)
    critic.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("inputs", "select", "selected_step", "selected_val_loss", "selected_return_mse"):
        del meta["config"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = DoubleCritic.from_pretrained(tmp_path / "old")
    assert loaded.config.inputs.vlm_only and loaded.config.select == "last" and loaded.config.selected_step is None
    assert not CriticParams().inputs.vlm_only and CriticParams().select == "best_return"  # not today's defaults
    assert same_weights(loaded, critic)
