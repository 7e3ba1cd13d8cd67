"""Per-channel attribution of the critic's scores (digiq/channel_attribution.py) on hand-built critics and inputs:
for a linear head ΔQ_c = w_c · (x_c − μ_c) (/ σ_c when standardized), which the tests compute by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from digiq.channel_attribution import attribution_table, channel_deltas, head_mean, head_slices
from digiq.channels import Inputs
from digiq.config import CriticParams
from digiq.critic import DoubleCritic
from digiq.errors import DigiqError
from digiq.training_data import TrainingData

WIDTHS = {"vlm": 3, "image": 4, "goal": 2, "prev_action": 2, "fields": 2, "action": 2}  # vlm: f(s, a) in Q (f(s) is 5 wide in V)
D_S = 5
OFFICIAL = Inputs(q=["vlm", "image", "goal", "prev_action", "action"], v=["image", "goal", "prev_action"])  # VLMDoubleCritic's


def linear_critic(inputs: Inputs, d_s: int, d_sa: int, *, standardize: bool = False, seed: int = 0) -> DoubleCritic:
    """Q = w_q · z(x) + 1 and V = w_v · z(x) − 1 on heads 1; heads 2 sit 100 lower, so max(head 1, head 2) is head 1."""
    torch.manual_seed(seed)
    critic = DoubleCritic(d_s, d_sa, CriticParams(hidden=[], standardize=standardize, inputs=inputs, device="cpu"))
    with torch.no_grad():
        for one, two, bias in ((critic.online.q1, critic.online.q2, 1.0), (critic.online.v1, critic.online.v2, -1.0)):
            one[-1].weight.copy_(torch.randn_like(one[-1].weight))
            one[-1].bias.fill_(bias)
            two[-1].weight.copy_(one[-1].weight)
            two[-1].bias.fill_(bias - 100.0)
    return critic.eval()


def test_slices_follow_the_canonical_order_and_check_the_width():
    slices = head_slices(OFFICIAL.q, WIDTHS, total=13)
    assert slices == {"vlm": slice(0, 3), "image": slice(3, 7), "goal": slice(7, 9), "prev_action": slice(9, 11), "action": slice(11, 13)}
    with pytest.raises(DigiqError, match="12"):
        head_slices(OFFICIAL.q, WIDTHS, total=12)


def test_linear_head_delta_is_the_weight_times_the_departure_from_the_mean():
    inputs = OFFICIAL
    critic = linear_critic(inputs, 8, 13)
    slices = head_slices(inputs.q, WIDTHS, total=13)
    x = torch.randn(6, 4, 13)  # [B, K, d_q]: any leading shape
    mean = torch.randn(13)
    deltas = channel_deltas(critic.q_value, x, slices, mean)
    w = critic.online.q1[-1].weight[0]
    assert list(deltas) == inputs.q
    for name, columns in slices.items():
        expected = ((x[..., columns] - mean[columns]) * w[columns]).sum(-1)
        torch.testing.assert_close(deltas[name], expected, rtol=1e-5, atol=1e-5)
    # linear and additive: the channels' Δ sum to Q(x) − Q(μ)
    torch.testing.assert_close(sum(deltas.values()), critic.q_value(x) - critic.q_value(mean), rtol=1e-5, atol=1e-5)


def test_standardized_head_uses_its_own_mean_and_scale():
    inputs = OFFICIAL
    critic = linear_critic(inputs, 8, 13, standardize=True)
    fit_q = torch.randn(50, 13) * 3 + 2
    critic.fit_standardization(torch.randn(50, 8), fit_q)
    mu, sigma = fit_q.mean(0), fit_q.std(0, unbiased=False)
    torch.testing.assert_close(head_mean(critic.online.q1), mu)
    x = torch.randn(7, 13)
    deltas = channel_deltas(critic.q_value, x, head_slices(inputs.q, WIDTHS), head_mean(critic.online.q1))
    w = critic.online.q1[-1].weight[0]
    goal = slice(7, 9)
    torch.testing.assert_close(deltas["goal"], ((x[:, goal] - mu[goal]) / sigma[goal] * w[goal]).sum(-1), rtol=1e-4, atol=1e-5)


def test_unstandardized_head_needs_a_mean():
    critic = linear_critic(OFFICIAL, 8, 13)
    with pytest.raises(DigiqError, match="training mean"):
        head_mean(critic.online.q1)
    assert torch.equal(head_mean(critic.online.q1, torch.ones(13)), torch.ones(13))


def test_a_head_with_one_channel_has_nothing_to_attribute():
    critic = linear_critic(Inputs(q=["vlm"], v=["vlm"]), 5, 3)
    assert channel_deltas(critic.q_value, torch.randn(4, 3), {"vlm": slice(0, 3)}, torch.zeros(3)) == {}


# ----------------------------------------------------------------------------------------------- the stage's table


def fake_data(n: int = 5, k: int = 3, seed: int = 1) -> TrainingData:
    """A training frame with every channel: n steps of one trajectory, k candidate slots (the last one masked at odd steps)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((n, k), bool)
    mask[1::2, -1] = False
    candidates = rng.normal(size=(n, k, WIDTHS["vlm"])).astype(np.float32) * mask[..., None]
    channels = {"image": rng.normal(size=(n, 4)), "goal": rng.normal(size=(n, 2)), "prev_action": rng.normal(size=(n, 2)),
                "fields": rng.normal(size=(n, 2)), "action": rng.normal(size=(n, k, 2)) * mask[..., None]}
    channels = {name: a.astype(np.float32) for name, a in channels.items()}
    frame = SimpleNamespace(state=rng.normal(size=(n, D_S)).astype(np.float32), candidates=candidates, candidate_mask=mask,
                            next_state=np.zeros((n, D_S), np.float32), channels=channels,
                            next_channels={name: np.zeros_like(a) for name, a in channels.items() if name != "action"})
    return TrainingData(frame=frame, traj_id=np.array(["t"] * n), step_id=np.arange(n), success=np.zeros(n, bool),
                        truncated=np.zeros(n, bool), distinct=mask, draws=mask.astype(np.float32), source="test")


def test_table_has_one_row_per_valid_candidate_with_hand_computed_deltas():
    data = fake_data()
    inputs = OFFICIAL
    critic = linear_critic(inputs, 8, 13)  # x_V: image 4 + goal 2 + prev_action 2
    rows, mean_rows = np.arange(5), np.array([0, 2, 4])
    table = attribution_table(critic, data, rows, mean_rows=mean_rows).to_pydict()
    assert list(table) == ["traj_id", "step_id", "cand_idx", "v", "q", "dv_image", "dv_goal", "dv_prev_action",
                           "dq_vlm", "dq_image", "dq_goal", "dq_prev_action", "dq_action"]
    assert len(table["q"]) == int(data.frame.candidate_mask.sum()) == 13
    at = next(i for i, (s, c) in enumerate(zip(table["step_id"], table["cand_idx"])) if (s, c) == (3, 1))
    f = data.frame
    w_q, w_v = critic.online.q1[-1].weight[0].detach().numpy(), critic.online.v1[-1].weight[0].detach().numpy()
    goal_mean = f.channels["goal"][mean_rows].mean(0)
    assert table["dq_goal"][at] == pytest.approx(float(w_q[7:9] @ (f.channels["goal"][3] - goal_mean)), abs=1e-5)
    assert table["dv_goal"][at] == pytest.approx(float(w_v[4:6] @ (f.channels["goal"][3] - goal_mean)), abs=1e-5)
    action_mean = f.channels["action"][mean_rows, 0].mean(0)  # the dataset actions' mean, as Standardize fits x_Q(s, a_data)
    assert table["dq_action"][at] == pytest.approx(float(w_q[11:13] @ (f.channels["action"][3, 1] - action_mean)), abs=1e-5)
    x_q = np.concatenate([f.candidates[3, 1], f.channels["image"][3], f.channels["goal"][3], f.channels["prev_action"][3], f.channels["action"][3, 1]])
    assert table["q"][at] == pytest.approx(float(w_q @ x_q + 1.0), abs=1e-5)
    assert table["v"][at] == table["v"][at - 1]  # V(s) is the same on each candidate row of a step


def test_the_default_inputs_attribute_the_fields_channel_in_both_heads():
    critic = linear_critic(Inputs(), 10, 15)  # x_V: image 4 + goal 2 + prev_action 2 + fields 2; x_Q: vlm 3 + those + action 2
    table = attribution_table(critic, fake_data(), np.arange(5), mean_rows=np.array([0, 2, 4])).to_pydict()
    assert [c for c in table if c.startswith("d")] == ["dv_image", "dv_goal", "dv_prev_action", "dv_fields", "dq_vlm",
                                                       "dq_image", "dq_goal", "dq_prev_action", "dq_fields", "dq_action"]


def test_vlm_only_critic_table_has_scores_and_no_deltas():
    data = fake_data()
    critic = linear_critic(Inputs(q=["vlm"], v=["vlm"]), D_S, WIDTHS["vlm"], standardize=True)
    critic.fit_standardization(torch.randn(5, D_S), torch.randn(5, WIDTHS["vlm"]))
    table = attribution_table(critic, data, np.arange(5))
    assert table.column_names == ["traj_id", "step_id", "cand_idx", "v", "q"] and table.num_rows == 13
    assert attribution_table(critic, data, np.arange(0)).num_rows == 0
