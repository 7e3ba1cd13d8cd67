"""Critic: TD / MC targets, Polyak update, diagnostics — on hand-computed examples — and a toy MDP."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from torch import nn

from digiq.config import CriticParams
from conftest import toy_transitions
from digiq.critic import CriticTrainer, DoubleCritic, advantage, conservative_gap, td_q_target, td_v_target, train_critic
from digiq.critic_checkpoint import CriticCheckpoint
from digiq.critic_diagnostics import (action_sensitivity, behavior_agreement, candidate_q, critic_diagnostics, ranking_quality,
                                      v_calibration)
from digiq.errors import DigiqError
from digiq.nn import EpochSampler, soft_update
from digiq.transitions import Batch, Transitions

torch.set_num_threads(1)


def set_linear(head: nn.Sequential, weight: list[float], bias: float = 0.0) -> None:
    """Make a hidden=() head compute x · weight + bias."""
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([weight]))
        head[0].bias.fill_(bias)


def linear_critic(d_s: int = 2, d_sa: int = 2, gamma: float = 0.95, **params) -> DoubleCritic:
    """Heads computing x · weight + bias on the raw features (no standardization layer), all weights 0."""
    critic = DoubleCritic(d_s, d_sa, CriticParams(hidden=[], device="cpu", standardize=False, **params), gamma=gamma)
    for heads in (critic.online, critic.target):
        for head in (heads.q1, heads.q2, heads.v1, heads.v2):
            set_linear(head, [0.0] * head[0].in_features)
    return critic


def hand_batch() -> Batch:
    return Batch(
        s=torch.tensor([[1.0, 1.0], [1.0, 1.0]]),
        sa=torch.tensor([[1.0, 4.0], [3.0, 2.0]]),
        s_next=torch.tensor([[2.0, 3.0], [5.0, -1.0]]),
        reward=torch.tensor([0.5, 1.0]),
        done=torch.tensor([0.0, 1.0]),
        mc_return=torch.tensor([1.0, 0.5]),
    )


def test_td_q_target_uses_min_of_target_v_heads_and_done():
    critic = linear_critic()
    set_linear(critic.target.v1, [1.0, 0.0])  # V̄1(s') = s'_0 → [2, 5]
    set_linear(critic.target.v2, [0.0, 1.0])  # V̄2(s') = s'_1 → [3, -1]
    # min → [2, -1];  y = r + 0.95 (1 − done) min:  [0.5 + 0.95·2, 1 + 0] = [2.4, 1.0]
    y = td_q_target(critic.target, hand_batch(), gamma=0.95)
    torch.testing.assert_close(y, torch.tensor([2.4, 1.0]))


def test_td_v_target_is_min_of_target_q_heads_at_the_dataset_action():
    critic = linear_critic()
    set_linear(critic.target.q1, [1.0, 0.0])  # Q̄1(s, a) = sa_0 → [1, 3]
    set_linear(critic.target.q2, [0.0, 1.0])  # Q̄2(s, a) = sa_1 → [4, 2]
    set_linear(critic.online.q1, [5.0, 5.0])  # the online heads must not matter
    torch.testing.assert_close(td_v_target(critic.target, hand_batch()), torch.tensor([1.0, 2.0]))


def test_trainer_td_losses_against_hand_targets():
    critic = linear_critic(gamma=0.95)
    set_linear(critic.target.v1, [1.0, 0.0])
    set_linear(critic.target.v2, [0.0, 1.0])
    set_linear(critic.target.q1, [1.0, 0.0])
    set_linear(critic.target.q2, [0.0, 1.0])
    log = CriticTrainer(critic).update(hand_batch())
    # online heads output 0 before the update: L_Q = 2 · mean(y_Q²) = 2 · (2.4² + 1²)/2 = 6.76
    # L_V = 2 · mean(y_V²) = 2 · (1² + 2²)/2 = 5.0
    assert log["q_loss"].item() == pytest.approx(6.76)
    assert log["v_loss"].item() == pytest.approx(5.0)
    assert log["q_target_mean"].item() == pytest.approx(1.7)
    assert log["td_error"].item() == pytest.approx(1.7)


def test_trainer_mc_regresses_both_heads_on_the_return():
    critic = linear_critic(target="mc")
    set_linear(critic.target.v1, [1.0, 0.0])  # targets must be ignored in MC
    before = [p.clone() for p in critic.target.parameters()]
    log = CriticTrainer(critic).update(hand_batch())
    # Q = V = 0: L = 2 · mean(G²) = 2 · (1² + 0.5²)/2 = 1.25 for both
    assert log["q_loss"].item() == pytest.approx(1.25)
    assert log["v_loss"].item() == pytest.approx(1.25)
    assert all(torch.equal(a, b) for a, b in zip(before, critic.target.parameters()))  # no Polyak step in MC


def hand_batch_with_candidates() -> Batch:
    """hand_batch plus 3 candidates per state (column 0 = the dataset action); state 1's last one is invalid."""
    cand_sa = torch.tensor([[[1.0, 4.0], [2.0, 0.0], [0.0, 0.0]],
                            [[3.0, 2.0], [1.0, 1.0], [9.0, 9.0]]])
    return hand_batch()._replace(cand_sa=cand_sa, cand_mask=torch.tensor([[True, True, True], [True, True, False]]))


def test_conservative_gap_by_hand():
    head = nn.Sequential(nn.Linear(2, 1))
    set_linear(head, [1.0, 0.0])  # Q(s, a) = sa_0: state 0 → [1, 2, 0], state 1 → [3, 1, (9 invalid)]
    gap0 = math.log(math.exp(1) + math.exp(2) + math.exp(0)) - 1.0
    gap1 = math.log(math.exp(3) + math.exp(1)) - 3.0
    assert conservative_gap(head, hand_batch_with_candidates()).item() == pytest.approx((gap0 + gap1) / 2)


def test_trainer_adds_the_weighted_conservative_term_to_the_q_loss():
    critic = linear_critic(gamma=0.95, cql_alpha=0.5)
    set_linear(critic.target.v1, [1.0, 0.0])
    set_linear(critic.target.v2, [0.0, 1.0])
    log = CriticTrainer(critic).update(hand_batch_with_candidates())
    # online Q ≡ 0 before the update: each head's gap = mean(log 3, log 2); L_Q = 6.76 (TD, as above) + 0.5 · 2 · gap
    gap = (math.log(3) + math.log(2)) / 2
    assert log["cql_gap"].item() == pytest.approx(gap)
    assert log["q_loss"].item() == pytest.approx(6.76 + 0.5 * 2 * gap)
    with pytest.raises(DigiqError, match="cand_sa"):
        train_critic(dataclasses.replace(toy_transitions(20), cand_sa=None, cand_mask=None, cand_count=None),
                     TOY.model_copy(update={"cql_alpha": 1.0}), **TOY_RUN)


def test_conservative_term_lowers_untaken_candidates_but_still_finds_the_right_action():
    """Toy MDP: π_β's action is wrong in ~40 % of states, the right one lies among the other candidates. The
    conservative term lowers the candidates the data never takes, yet the critic still ranks the right action first."""
    data = toy_transitions(400, seed=0)
    plain, _ = train_critic(data, TOY, **TOY_RUN)
    conservative, history = train_critic(data, TOY.model_copy(update={"cql_alpha": 1.0}), **TOY_RUN)
    q_plain, q_cons = candidate_q(plain, data), candidate_q(conservative, data)
    # measured (seed 0): mean Q of the other candidates 0.065 → −0.59, of the dataset action 0.30 → 0.29;
    # states ranking another candidate first 0.42 → 0.40 (the right action where π_β erred); ranking ≥ 0.99 in both
    assert q_cons[:, 1:].mean() < q_plain[:, 1:].mean() - 0.3
    assert abs(q_cons[:, 0].mean() - q_plain[:, 0].mean()) < 0.05
    plain_diag, cons_diag = critic_diagnostics(plain, data), critic_diagnostics(conservative, data)
    assert cons_diag["argmax_not_dataset_frac"] > 0.3 and cons_diag["ranking_quality"] > 0.95
    assert history[-1]["cql_gap"] < history[0]["cql_gap"]


def test_soft_update_is_polyak_average():
    target, source = nn.Linear(1, 1), nn.Linear(1, 1)
    set_linear(nn.Sequential(target), [0.0], 0.0)
    set_linear(nn.Sequential(source), [1.0], 2.0)
    soft_update(target, source, tau=0.1)  # 0.1·1 + 0.9·0 = 0.1 ; bias 0.1·2 = 0.2
    assert target.weight.item() == pytest.approx(0.1) and target.bias.item() == pytest.approx(0.2)
    soft_update(target, source, tau=0.1)  # 0.1·1 + 0.9·0.1 = 0.19 ; bias 0.2 + 0.9·0.2 = 0.38
    assert target.weight.item() == pytest.approx(0.19) and target.bias.item() == pytest.approx(0.38)


def test_trainer_moves_targets_by_tau_after_each_update():
    critic = linear_critic(tau=0.1)
    old_target = [p.clone() for p in critic.target.parameters()]
    CriticTrainer(critic).update(hand_batch())
    for old, new, online in zip(old_target, critic.target.parameters(), critic.online.parameters()):
        torch.testing.assert_close(new, 0.1 * online + 0.9 * old)


def test_advantage_is_max_q_heads_minus_max_v_heads():
    critic = linear_critic(d_s=1, d_sa=1)
    set_linear(critic.online.q1, [1.0])  # candidates sa = [1, −1] → Q1 = [1, −1]
    set_linear(critic.online.q2, [2.0])  # Q2 = [2, −2] → max = [2, −1]
    set_linear(critic.online.v1, [1.0])  # s = 3 → V1 = 3
    set_linear(critic.online.v2, [-1.0])  # V2 = −3 → max = 3
    adv = advantage(critic, torch.tensor([[3.0]]), torch.tensor([[[1.0], [-1.0]]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.0, -4.0]]))  # [2 − 3, −1 − 3]


def diagnostics_data() -> tuple[DoubleCritic, Transitions]:
    """Q = f(s, a) (1-d), V = f(s) (1-d): diagnostics computable by hand."""
    critic = linear_critic(d_s=1, d_sa=1)
    for head in (critic.online.q1, critic.online.q2, critic.online.v1, critic.online.v2):
        set_linear(head, [1.0])
    cand = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 0.0]]).unsqueeze(-1)
    data = Transitions(s=torch.tensor([[1.0], [2.0]]), sa=cand[:, 0], s_next=torch.zeros(2, 1), reward=torch.zeros(2),
                       done=torch.ones(2), mc_return=torch.tensor([2.0, 4.0]), cand_sa=cand,
                       cand_mask=torch.tensor([[True, True, True], [True, True, False]]), traj_success=torch.tensor([True, True]))
    return critic, data


def test_action_sensitivity_by_hand():
    critic, data = diagnostics_data()
    out = action_sensitivity(critic, data)
    # state 0: Q = [1, 3, 2] → std √(2/3) = 0.8165, mean 2 ; state 1: Q = [5, 5] (third masked) → std 0, mean 5
    # within = (0.8165 + 0)/2 = 0.40825 ; across = std([2, 5]) = 1.5 ; ratio 0.27217
    assert out["q_std_within_state"] == pytest.approx(math.sqrt(2 / 3) / 2, rel=1e-5)
    assert out["q_std_across_states"] == pytest.approx(1.5)
    assert out["action_sensitivity"] == pytest.approx(math.sqrt(2 / 3) / 2 / 1.5, rel=1e-5)
    # argmax: state 0 → candidate 1 (≠ dataset); state 1 → tie 5 = 5 goes to index 0 → 1/2
    assert out["argmax_not_dataset_frac"] == pytest.approx(0.5)


def test_behavior_agreement_by_hand():
    critic, data = diagnostics_data()
    # state 0: Q = [1, 3, 2] → argmax 1; draws [1, 2, 5] → mode 2 (disagree; the argmax has 2 draws, the mode 5)
    # state 1: Q = [5, 5] → argmax 0 (tie); draws [3, 3] (third masked, its 9 ignored) → mode 0 (agree; 3 and 3)
    data.cand_count = torch.tensor([[1.0, 2.0, 5.0], [3.0, 3.0, 9.0]])
    out = behavior_agreement(critic, data)
    assert out == {"argmax_is_behavior_mode_frac": pytest.approx(0.5), "argmax_draws_mean": pytest.approx(2.5),
                   "behavior_mode_draws_mean": pytest.approx(4.0)}
    assert set(out) <= set(critic_diagnostics(critic, data))


def test_ranking_quality_by_hand_ties_count_half():
    critic, data = diagnostics_data()
    # state 0: Q(a0) = 1 beats neither 3 nor 2 → 0 ; state 1: 5 vs 5 → tie → ½ (masked 0 ignored) ; mean 0.25
    assert ranking_quality(critic, data)["ranking_quality"] == pytest.approx(0.25)
    data.traj_success = torch.tensor([False, True])  # only state 1 counts
    assert ranking_quality(critic, data) == {"ranking_quality": pytest.approx(0.5), "ranking_states": 1}


def test_v_calibration_by_hand():
    critic, data = diagnostics_data()
    out = v_calibration(critic, data)  # V = [1, 2], G = [2, 4] → errors [−1, −2]
    assert out["v_mean_error"] == pytest.approx(-1.5)
    assert out["v_mae"] == pytest.approx(1.5)
    assert out["v_return_corr"] == pytest.approx(1.0)
    assert set(critic_diagnostics(critic, data)) >= {"action_sensitivity", "ranking_quality", "v_return_corr"}


def test_epoch_sampler_visits_every_row_once_per_epoch():
    sampler = EpochSampler(10, 5, torch.Generator().manual_seed(0))
    first_epoch = torch.cat([sampler.next(), sampler.next()])
    assert sorted(first_epoch.tolist()) == list(range(10))
    batches = [sampler.next() for _ in range(7)]  # 10 rows, batch 5 → crosses epochs, always full batches
    assert all(len(b) == 5 for b in batches)


def test_transitions_refuse_bad_input_naming_the_field():
    good = dict(s=torch.zeros(3, 2), sa=torch.zeros(3, 4), s_next=torch.zeros(3, 2), reward=torch.zeros(3),
                done=torch.zeros(3), mc_return=torch.zeros(3))
    with pytest.raises(DigiqError, match=r"feats\.pt: s_next: expected shape \[3, 2\]"):
        Transitions(**{**good, "s_next": torch.zeros(3, 5)}, source="feats.pt")
    with pytest.raises(DigiqError, match="reward: expected finite"):
        Transitions(**{**good, "reward": torch.tensor([0.0, math.nan, 1.0])})
    with pytest.raises(DigiqError, match="cand_sa: expected"):
        Transitions(**good, cand_sa=torch.zeros(3, 5, 3))
    with pytest.raises(DigiqError, match="cand_mask: column 0"):
        Transitions(**good, cand_sa=torch.zeros(3, 5, 4), cand_mask=torch.tensor([[False, True, True, True, True]] * 3))
    with pytest.raises(DigiqError, match="traj_success: expected dtype torch.bool"):
        Transitions(**good, traj_success=torch.ones(3))
    with pytest.raises(DigiqError, match="cand_sa: required"):
        action_sensitivity(linear_critic(), Transitions(**good))


def test_save_pretrained_round_trip_from_any_path(tmp_path):
    data = toy_transitions(30, seed=1)
    critic, _ = train_critic(data, CriticParams(updates=20, hidden=[16], device="cpu"), gamma=0.95, seed=3)
    critic.save_pretrained(tmp_path / "a" / "critic")
    shutil.move(tmp_path / "a", tmp_path / "elsewhere")  # no absolute paths inside
    loaded = DoubleCritic.from_pretrained(tmp_path / "elsewhere" / "critic")
    assert loaded.config == critic.config
    for a, b in zip(critic.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(advantage(loaded, data.s, data.cand_sa), advantage(critic, data.s, data.cand_sa), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "elsewhere" / "critic").iterdir()) == ["config.json", "model.safetensors"]


def test_standardized_heads_see_unit_scale_inputs_and_keep_the_scaling_through_save_and_polyak(tmp_path):
    """Features on wildly different scales (one constant): each head's input layer maps the training rows to mean 0,
    std 1 (the constant column to 0, finite); targets carry the same scaling, Polyak steps leave it alone, and a saved
    critic reloads with it."""
    data = toy_transitions(200, seed=0)
    scale = torch.tensor([1e-3, 1.0, 1e3, 0.0]).repeat(data.sa.shape[1] // 4)
    data = dataclasses.replace(data, sa=data.sa * scale, cand_sa=data.cand_sa * scale, s=data.s * 100.0 + 5.0,
                               s_next=data.s_next * 100.0 + 5.0)
    critic, _ = train_critic(data, CriticParams(updates=30, hidden=[8], device="cpu", standardize=True), **TOY_RUN)
    for heads in (critic.online, critic.target):
        z = heads.q1[0](data.sa)
        torch.testing.assert_close(z.mean(0), torch.zeros_like(scale), atol=1e-4, rtol=0)
        torch.testing.assert_close(z.std(0, unbiased=False), (scale != 0).float(), atol=1e-4, rtol=0)
        torch.testing.assert_close(heads.v2[0](data.s).std(0, unbiased=False), torch.ones(data.s.shape[1]), atol=1e-4, rtol=0)
    assert torch.equal(critic.online.q1[0].mean, critic.target.q1[0].mean)
    critic.save_pretrained(tmp_path / "c")
    loaded = DoubleCritic.from_pretrained(tmp_path / "c")
    assert torch.equal(loaded.online.q2[0].std, critic.online.q2[0].std)
    torch.testing.assert_close(advantage(loaded, data.s, data.cand_sa), advantage(critic, data.s, data.cand_sa), rtol=0, atol=0)


def test_a_critic_saved_before_the_standardize_option_loads_with_raw_inputs(tmp_path):
    """Folders written before ``standardize`` existed have no such key and no input layers: they load as they were
    trained (raw inputs), not with the new default."""
    data = toy_transitions(30, seed=1)
    critic, _ = train_critic(data, CriticParams(updates=10, hidden=[8], device="cpu", standardize=False), **TOY_RUN)
    critic.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["config"]["standardize"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = DoubleCritic.from_pretrained(tmp_path / "old")
    assert loaded.config.standardize is False and CriticParams().standardize is True
    torch.testing.assert_close(advantage(loaded, data.s, data.cand_sa), advantage(critic, data.s, data.cand_sa), rtol=0, atol=0)


def test_standardization_lets_the_critic_use_a_small_scale_feature():
    """Q depends only on a feature 1000× smaller than a noise feature: hand-built data where the target is the small
    feature's sign. Standardised inputs find it; raw inputs under the same updates fit it far worse."""
    g = torch.Generator().manual_seed(0)
    n = 512
    signal = torch.randint(0, 2, (n,), generator=g).float()
    sa = torch.stack([(signal - 0.5) * 1e-3, torch.randn(n, generator=g) * 10.0], dim=1)
    s = torch.zeros(n, 1)
    data = Transitions(s=s, sa=sa, s_next=s, reward=signal, done=torch.ones(n), mc_return=signal)

    def q_error(standardize: bool) -> float:
        critic, _ = train_critic(data, CriticParams(updates=300, hidden=[32], device="cpu", standardize=standardize), **TOY_RUN)
        return (critic.q_value(sa) - signal).abs().mean().item()

    assert q_error(True) < 0.1 < q_error(False)


def test_from_pretrained_refuses_broken_folders(tmp_path):
    with pytest.raises(DigiqError, match="config.json: missing"):
        DoubleCritic.from_pretrained(tmp_path / "nothing")
    linear_critic().save_pretrained(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**meta, "kind": "digiq.policy"}))
    with pytest.raises(DigiqError, match="kind: expected kind 'digiq.critic'"):
        DoubleCritic.from_pretrained(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({**meta, "dims": {"d_s": 3, "d_sa": 2}}))
    with pytest.raises(DigiqError, match="weights do not match the config"):
        DoubleCritic.from_pretrained(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "gama": 0.9}}))
    with pytest.raises(DigiqError, match=r"config\.gama"):
        DoubleCritic.from_pretrained(tmp_path / "c")


TOY = CriticParams(updates=600, hidden=[64, 64], log_every=50, device="cpu")
TOY_RUN = {"gamma": 0.95, "seed": 0}  # toy_transitions' γ


def test_toy_mdp_critic_uses_the_action_and_is_deterministic():
    data = toy_transitions(400, seed=0)
    points: list[int] = []
    critic, history = train_critic(data, TOY, log_fn=lambda point, step: points.append(step), **TOY_RUN)
    again, _ = train_critic(data, TOY, **TOY_RUN)
    assert all(torch.equal(a, b) for a, b in zip(critic.state_dict().values(), again.state_dict().values()))
    assert points == list(range(50, 601, 50)) and history[-1]["step"] == 600
    assert history[-1]["q_loss"] < history[0]["q_loss"]
    diag = critic_diagnostics(critic, data)
    # measured (seed 0): sensitivity ≈ 2.8, ranking ≈ 1.00, V/return correlation ≈ 0.34 (outcomes are random)
    assert diag["action_sensitivity"] > 1.0
    assert diag["ranking_quality"] > 0.8
    assert diag["v_return_corr"] > 0.2


def test_toy_mdp_mc_ablation_and_validation_losses():
    data, val = toy_transitions(300, seed=0), toy_transitions(100, seed=1)
    critic, history = train_critic(data, TOY.model_copy(update={"target": "mc"}), val_data=val, **TOY_RUN)
    assert {"val_q_loss", "val_v_loss"} <= set(history[-1])
    assert critic_diagnostics(critic, val)["ranking_quality"] > 0.8  # held-out episodes


def test_interrupted_training_resumes_from_its_checkpoint_to_the_same_critic(tmp_path):
    """Stopped after 230 updates (last checkpoint at 200), re-run: same weights and history as one uninterrupted run,
    the past points replayed to log_fn; a checkpoint of other data or config is ignored."""
    data, val = toy_transitions(200, seed=0), toy_transitions(60, seed=1)
    config = TOY.model_copy(update={"updates": 400})
    reference, ref_history = train_critic(data, config, val_data=val, **TOY_RUN)
    assert reference.config.selected_step < 400  # best_return kept an earlier update: its weights came through the checkpoint
    ckpt = tmp_path / "critic.ckpt"

    def stop_at_230(point, step):
        if step >= 230:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # logged points come every 50 updates: the one at 250 stops it
        train_critic(data, config, stop_at_230, val_data=val, checkpoint=ckpt, checkpoint_every=100, **TOY_RUN)
    assert list(CriticCheckpoint(ckpt).steps().values()) == [200]
    points: list[int] = []
    resumed, history = train_critic(data, config, lambda point, step: points.append(step), val_data=val,
                                    checkpoint=ckpt, checkpoint_every=100, **TOY_RUN)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))
    assert history == ref_history and points == list(range(50, 401, 50))
    other = toy_transitions(200, seed=2)
    fresh, _ = train_critic(other, config, val_data=val, checkpoint=ckpt, checkpoint_every=100, **TOY_RUN)
    plain, _ = train_critic(other, config, val_data=val, **TOY_RUN)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fresh.state_dict().values()))
