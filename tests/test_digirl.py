"""DigiRL offline (digiq/digirl.py): returns, value targets, the step advantage and its filter by hand, and the whole
weighting on a toy dataset (seeded, refusing bad input)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from digiq.critic import Transitions
from digiq.digirl import (DigirlParams, digirl_weights, discounted_returns, group_trajectories, imitated, step_advantage,
                          trajectory_kept)
from digiq.errors import DigiqError
from digiq.training_data import TrainingData


def toy(traj_rewards: list[list[float]], k: int = 3, d: int = 2, seed: int = 0) -> tuple[TrainingData, Transitions]:
    """One trajectory per reward list; feature 0 of x_V is +1 in trajectories that end with reward > 0, else −1
    (the rest noise), so the values can tell them apart. Rows are stored in a shuffled order."""
    gen = np.random.default_rng(seed)
    rows = [(f"t{i}", h, r, h == len(rs) - 1, rs[-1] > 0) for i, rs in enumerate(traj_rewards) for h, r in enumerate(rs)]
    rows = [rows[i] for i in gen.permutation(len(rows))]
    n = len(rows)
    s = gen.normal(size=(n, d)).astype(np.float32) * 0.1
    s[:, 0] = [1.0 if ok else -1.0 for *_, ok in rows]
    s_next = np.where(np.array([last for *_, last, _ in rows])[:, None], 0.0, s).astype(np.float32)
    data = TrainingData(frame=None, traj_id=np.array([r[0] for r in rows]), step_id=np.array([r[1] for r in rows]),
                        success=np.array([r[4] for r in rows]), truncated=np.zeros(n, dtype=bool),
                        distinct=np.ones((n, k), dtype=bool), draws=np.ones((n, k), dtype=np.float32), source="toy")
    t = torch.from_numpy
    transitions = Transitions(s=t(s), sa=torch.zeros(n, 2), s_next=t(s_next), reward=torch.tensor([r[2] for r in rows]),
                              done=torch.tensor([float(r[3]) for r in rows]), mc_return=torch.zeros(n),
                              cand_sa=torch.zeros(n, k, 2), cand_mask=torch.ones(n, k, dtype=torch.bool), source="toy")
    return data, transitions


FAST = DigirlParams(step_hidden=[16], lr=1e-2, step_updates=150, instruction_updates=150, step_batch_size=32,
                    instruction_batch_size=16, val_fraction=0.25, device="cpu")


def test_step_advantage_and_filter_on_a_hand_computed_three_step_trajectory():
    # γ = 0.1, r = (0, 0, 1): G = (0.01, 0.1, 1). V(s) = (0.5, 0.7, 0.3); V(s') = (0.7, 0.3, 0: terminal, no s').
    v, v_next = torch.tensor([0.5, 0.7, 0.3]), torch.tensor([0.7, 0.3, 0.0])
    reward = torch.tensor([0.0, 0.0, 1.0])
    trajs = group_trajectories(np.array(["a", "a", "a"]), np.array([0, 1, 2]))
    g = torch.from_numpy(discounted_returns(reward.double().numpy(), trajs, 0.1)).float()
    assert torch.allclose(g, torch.tensor([0.01, 0.1, 1.0]))
    adv = step_advantage(v, v_next, reward, g, offset=0.05)
    # 0.7 − 0.5 − 0.05 + 0 + 0.01;  0.3 − 0.7 − 0.05 + 0 + 0.1;  0 − 0.3 − 0.05 + 1 + 1
    assert torch.allclose(adv, torch.tensor([0.16, -0.35, 1.65]))
    assert imitated(adv, torch.ones(3, dtype=torch.bool)).tolist() == [True, False, True]
    assert imitated(adv, torch.zeros(3, dtype=torch.bool)).tolist() == [False, False, False]  # trajectory filtered out


def test_returns_and_value_targets_by_hand_in_shuffled_row_order():
    # rows: (b,1) (a,2) (a,0) (b,0) (a,1); a = r (0, 0, 1), b = r (0, 0).
    traj, step = np.array(["b", "a", "a", "b", "a"]), np.array([1, 2, 0, 0, 1])
    reward = np.array([0.0, 1.0, 0.0, 0.0, 0.0])
    trajs = group_trajectories(traj, step)
    assert trajs.first.tolist() == [2, 3] and trajs.last.tolist() == [1, 0]  # a then b (sorted ids)
    g = discounted_returns(reward, trajs, 0.5)
    assert g.tolist() == [0.0, 1.0, 0.25, 0.0, 0.5]
    assert (g > 0).tolist() == [False, True, True, False, True]  # y_h = 1[G_h > 0]
    assert (g[trajs.last] > 0).tolist() == [True, False]  # y_τ = 1[G_H > 0]
    with pytest.raises(DigiqError, match="twice"):
        group_trajectories(np.array(["a", "a"]), np.array([0, 0]))


def test_trajectory_filter_keeps_the_top_share_by_numpys_quantile():
    kept, cutoff = trajectory_kept(np.array([1.0, 0.0, 0.0, 0.0, 0.0]), 0.1)
    assert cutoff == pytest.approx(0.6) and kept.tolist() == [True, False, False, False, False]  # 0 + 0.6·(1 − 0)
    kept, cutoff = trajectory_kept(np.array([1.0, 1.0, 1.0, 0.0, 0.0]), 0.1)  # success > 10 %: the successes
    assert cutoff == 1.0 and kept.tolist() == [True, True, True, False, False]
    # r(τ) − V_traj(c): scores 0.1, 0.8, 0.5, −0.1, median 0.3: the successes on instructions the value found hard
    kept, cutoff = trajectory_kept(np.array([1.0 - 0.9, 1.0 - 0.2, 1.0 - 0.5, 0.0 - 0.1]), 0.5)
    assert cutoff == pytest.approx(0.3) and kept.tolist() == [False, True, True, False]


def test_weights_imitate_only_dataset_actions_of_kept_successes_and_the_values_learn():
    rewards = [[0.0, 0.0, 1.0]] * 6 + [[0.0, 0.0, 0.0]] * 6
    data, transitions = toy(rewards)
    weights, metrics = digirl_weights(data, transitions, FAST, gamma=0.5, seed=0)
    assert weights.shape == (len(data), 3) and (weights[:, 1:] == 0).all()
    kept = weights[:, 0] > 0
    assert not kept[~torch.from_numpy(data.success)].any()  # 50 % success ≥ 10 %: only successes pass the filter
    assert kept[torch.from_numpy(data.success) & (transitions.done > 0)].all()  # A ≥ 2 − 1 − 0.05 at a final success
    assert metrics["frac_trajectories_kept"] == 0.5 and metrics["trajectory_cutoff"] == 1.0
    assert metrics["n_kept"] == int(kept.sum()) and metrics["frac_states_kept"] == pytest.approx(kept.float().mean().item())
    assert metrics["step_value_val_acc"] == 1.0 and metrics["instruction_value_val_acc"] == 1.0
    assert metrics["step_value_loss"] < 0.2 and metrics["instruction_value_loss"] < 0.2


def test_with_a_small_discount_only_the_final_steps_of_successes_clear_the_offset():
    # V ≈ 1 on every state of a success: A = V(s') − V(s) − 0.05 + r + G ≈ −0.05 + 0.01^(2−h) for h < 2 (dropped);
    # the last step has no s' (V(s') = 0): A = 0 − 1 − 0.05 + 1 + 1 = 0.95 (kept).
    data, transitions = toy([[0.0, 0.0, 1.0]] * 6 + [[0.0, 0.0, 0.0]] * 6)
    weights, metrics = digirl_weights(data, transitions, FAST, gamma=0.01, seed=0)
    final_success = torch.from_numpy(data.success) & (transitions.done > 0)
    assert torch.equal(weights[:, 0] > 0, final_success)
    assert metrics["mean_step_advantage_kept"] == pytest.approx(0.95, abs=1e-3)


def test_value_filter_ranks_trajectories_by_reward_minus_instruction_value():
    data, transitions = toy([[0.0, 1.0]] * 8 + [[0.0, 0.0]] * 2)
    params = FAST.model_copy(update={"trajectory_filter": "value", "top_fraction": 0.5})
    weights, metrics = digirl_weights(data, transitions, params, gamma=0.5, seed=0)
    assert metrics["frac_trajectories_kept"] == pytest.approx(0.5)
    assert not (weights[~torch.from_numpy(data.success), 0] > 0).any()


def test_same_seed_same_weights_and_metrics():
    data, transitions = toy([[0.0, 0.0, 1.0]] * 4 + [[0.0, 0.0]] * 4)
    params = FAST.model_copy(update={"step_updates": 20, "instruction_updates": 20})
    w1, m1 = digirl_weights(data, transitions, params, gamma=0.5, seed=3)
    w2, m2 = digirl_weights(data, transitions, params, gamma=0.5, seed=3)
    assert torch.equal(w1, w2) and m1 == m2


def test_bad_input_is_refused_with_a_clear_error():
    data, transitions = toy([[0.0, 0.0]] * 3)
    with pytest.raises(DigiqError, match="no trajectory succeeded"):
        digirl_weights(data, transitions, FAST, gamma=0.5, seed=0)
    data, transitions = toy([[0.0, 1.0]] * 3)
    with pytest.raises(DigiqError, match="transitions"):
        digirl_weights(data, transitions.subset(torch.arange(4)), FAST, gamma=0.5, seed=0)
    data.step_id = data.step_id[:-1]
    with pytest.raises(DigiqError, match="step_id"):
        digirl_weights(data, transitions, FAST, gamma=0.5, seed=0)
    with pytest.raises(ValidationError):
        DigirlParams(top_fraction=0.0)
    with pytest.raises(ValidationError):
        DigirlParams(trajectory_filter="advantage")


def test_the_settings_module_can_embed_the_params_without_importing_torch():
    code = "import sys, digiq.digirl; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
