"""Policy extraction: the Best-of-N rule, each baseline's weights and loss (by hand), and a toy run."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import toy_transitions
from digiq.actor import CandidatePolicy, actor_record, imitation_loss, packed_candidates, train_actor
from digiq.config import ActorParams, CriticParams
from digiq.critic import first_argmax, train_critic
from digiq.transitions import Transitions
from digiq.critic_diagnostics import candidate_q
from digiq.errors import DigiqError
from digiq.extraction_weights import awr_weights, best_of_n_weights, method_weights, sample_n_subset

torch.set_num_threads(1)


def tiny_data(success: list[bool], k: int = 3) -> Transitions:
    b = len(success)
    return Transitions(s=torch.zeros(b, 2), sa=torch.zeros(b, 2), s_next=torch.zeros(b, 2), reward=torch.zeros(b),
                       done=torch.ones(b), mc_return=torch.zeros(b), cand_sa=torch.zeros(b, k, 2),
                       traj_success=torch.tensor(success))


def test_best_of_n_rule_by_hand():
    adv = torch.tensor([
        [0.05, 0.30, 0.20],   # best = 1 (0.30 > 0.10)            → imitate candidate 1
        [0.20, 0.20, 0.10],   # tie 0/1 → lowest index 0 wins       → imitate the dataset action
        [0.00, 0.08, -0.30],  # best = 1 but 0.08 ≤ 0.10            → nothing kept
        [0.00, 0.50, 0.90],   # candidate 2 not in the N-subset     → best = 1, kept
        [0.10, 0.00, 0.00],   # 0.10 is not > 0.10 (strict)         → nothing kept
    ])
    subset = torch.ones(5, 3, dtype=torch.bool)
    subset[3, 2] = False
    weights, best = best_of_n_weights(adv, subset, threshold=0.10)
    assert best.tolist() == [1, 0, 1, 1, 0]
    assert weights.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_n_subset_always_holds_the_dataset_action_only_valid_ones_and_is_seeded():
    mask = torch.ones(500, 8, dtype=torch.bool)
    mask[:, 5:] = False  # 5 valid candidates per state
    mask[:100, 2:] = False  # 2 valid in the first 100 states
    subset = sample_n_subset(mask, mask.float(), 4, torch.Generator().manual_seed(0))
    assert subset[:, 0].all()  # dataset action always in
    assert not (subset & ~mask).any()  # never an invalid candidate
    assert subset[:100].sum(dim=1).eq(2).all() and subset[100:].sum(dim=1).eq(4).all()  # min(N, valid)
    assert subset[100:, 1:5].float().mean(dim=0).sub(0.75).abs().max() < 0.08  # 3 of the 4 others, uniformly
    assert torch.equal(subset, sample_n_subset(mask, mask.float(), 4, torch.Generator().manual_seed(0)))
    assert not torch.equal(subset, sample_n_subset(mask, mask.float(), 4, torch.Generator().manual_seed(1)))


def test_n_subset_proposes_candidates_as_often_as_pi_beta_draws_them():
    # the dataset action plus one more of the 12 other draws: its own second draw, 9 of candidate 1, one each of 2 and 3
    mask = torch.tensor([[True, True, True, True, False]]).expand(4000, 5)
    count = torch.tensor([[2.0, 9.0, 1.0, 1.0, 0.0]]).expand(4000, 5)  # the dataset action was drawn twice
    subset = sample_n_subset(mask, count, 2, torch.Generator().manual_seed(0))
    assert subset[:, 0].all() and subset.sum(dim=1).le(2).all() and not subset[:, 4].any()
    torch.testing.assert_close(subset[:, 1:4].float().mean(dim=0), torch.tensor([9 / 12, 1 / 12, 1 / 12]), atol=0.02, rtol=0)
    assert subset.sum(dim=1).eq(1).float().mean().item() == pytest.approx(1 / 12, abs=0.02)  # its second draw: nothing new
    everything = sample_n_subset(mask, count, 64, torch.Generator().manual_seed(0))  # N ≥ draws: every candidate
    assert everything[:, :4].all()


def test_best_of_one_only_ever_considers_the_dataset_action():
    data = tiny_data([True, True])
    adv = torch.tensor([[0.5, 0.9, 0.9], [0.05, 0.9, 0.9]])
    weights, metrics = method_weights(actor_record(ActorParams(n=1), "digiq"), data, adv, torch.Generator().manual_seed(0))
    assert weights.tolist() == [[1, 0, 0], [0, 0, 0]]  # 0.5 > 0.1 kept; 0.05 not
    assert metrics["frac_states_kept"] == 0.5 and metrics["mean_advantage_kept"] == pytest.approx(0.5)


def test_digiq_metrics_by_hand():
    data = tiny_data([True, False])
    adv = torch.tensor([[0.0, 0.4, 0.2], [0.0, 0.05, 0.3]])
    weights, metrics = method_weights(actor_record(ActorParams(n=3), "digiq"), data, adv, torch.Generator().manual_seed(0))
    assert weights.tolist() == [[0, 1, 0], [0, 0, 1]]
    assert metrics == {"n_states": 2, "n_kept": 2, "frac_states_kept": 1.0, "frac_imitated_not_dataset": 1.0,
                       "mean_advantage_kept": pytest.approx(0.35)}  # (0.4 + 0.3)/2


def test_bc_and_filtered_bc_weights():
    data = tiny_data([True, False, True])
    gen = torch.Generator().manual_seed(0)
    bc, bc_metrics = method_weights(actor_record(ActorParams(), "bc"), data, None, gen)
    assert bc.tolist() == [[1, 0, 0]] * 3 and bc_metrics["frac_states_kept"] == 1.0
    fbc, fbc_metrics = method_weights(actor_record(ActorParams(), "filtered-bc"), data, None, gen)
    assert fbc.tolist() == [[1, 0, 0], [0, 0, 0], [1, 0, 0]]  # successful trajectories only
    assert fbc_metrics["n_kept"] == 2 and fbc_metrics["frac_states_kept"] == pytest.approx(2 / 3)


def test_awr_weights_by_hand_including_clipping():
    # β = 0.1: exp(0.1/0.1) = e, exp(−0.1/0.1) = 1/e, exp(0.5/0.1) = e⁵ ≈ 148.4 → clipped to 10
    w = awr_weights(torch.tensor([0.1, -0.1, 0.5]), beta=0.1, max_weight=10.0)
    torch.testing.assert_close(w, torch.tensor([math.e, 1 / math.e, 10.0]))
    data = tiny_data([True, True, True])
    adv = torch.tensor([[0.1, 9.0, 9.0], [-0.1, 9.0, 9.0], [0.5, 9.0, 9.0]])
    weights, metrics = method_weights(actor_record(ActorParams(awr_beta=0.1, awr_max_weight=10.0), "awr"), data, adv, torch.Generator())
    torch.testing.assert_close(weights[:, 0], w)
    assert weights[:, 1:].eq(0).all()  # AWR weights the dataset action only
    # Σ w·A / Σ w = (0.1e − 0.1/e + 5)/(e + 1/e + 10)
    assert metrics["mean_advantage_kept"] == pytest.approx((0.1 * math.e - 0.1 / math.e + 5) / (math.e + 1 / math.e + 10), rel=1e-5)


def test_imitation_loss_by_hand():
    log_probs = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.9, 1.0]]))
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    # −(1·log 0.5 + 2·log 0.9)/2 = (0.693147 + 0.210721)/2 = 0.451934
    assert imitation_loss(log_probs, weights).item() == pytest.approx(0.451934, rel=1e-5)


def test_reinforce_negative_advantage_pushes_the_action_down():
    data = tiny_data([False])
    adv = torch.tensor([[0.0, -1.0, 0.5]])
    weights, metrics = method_weights(actor_record(ActorParams(n=2), "reinforce"), data, adv, torch.Generator().manual_seed(0))
    assert weights[0, 0] == 0 and weights.ne(0).sum() == 1  # N = 2: dataset action (A = 0) + one other
    assert metrics["frac_states_kept"] == 1.0
    # by hand: logits z = [0, 0], π = [½, ½], W = [0, −1]: L = −(−1)·log π₁ = log ½
    # ∂L/∂z_j = −W_j + π_j Σ_k W_k → [0 + ½·(−1), 1 + ½·(−1)] = [−½, +½]: descent lowers z₁
    z = torch.zeros(1, 2, requires_grad=True)
    loss = imitation_loss(torch.log_softmax(z, dim=-1), torch.tensor([[0.0, -1.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(0.5))
    torch.testing.assert_close(z.grad, torch.tensor([[-0.5, 0.5]]))


def test_policy_masks_invalid_candidates_and_breaks_ties_low():
    policy = CandidatePolicy(2, 2, ActorParams(hidden=()))
    with torch.no_grad():
        policy.scorer[0].weight.zero_()
        policy.scorer[0].bias.zero_()  # every candidate scores 0: a three-way tie
    s, cand = torch.zeros(1, 2), torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    ones = mask.float()
    torch.testing.assert_close(policy.log_probs(s, cand, mask, ones).exp(), torch.tensor([[0.5, 1.0, 0.5]]))  # masked: log π := 0
    assert policy.act(s, cand, mask, ones).item() == 0
    draws = policy.act(s.expand(400, 2), cand.expand(400, 3, 2), mask.expand(400, 3), ones.expand(400, 3), mode="sample",
                       generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 2}
    action_only = CandidatePolicy(2, 3, ActorParams(use_state=False, hidden=(4,)))  # scores f(s, a) alone
    assert action_only.scorer[0].in_features == 3 and action_only.logits(s, torch.zeros(1, 3, 3), mask, ones).shape == (1, 3)


def test_the_behavior_prior_pools_each_candidates_draws():
    # π(k | s) = n_k·exp g_k / Σ_j n_j·exp g_j: with g ≡ 0 it is π_β's empirical mix of draws, [3, 1] → [¾, ¼]
    policy = CandidatePolicy(2, 2, ActorParams(hidden=()))
    with torch.no_grad():
        policy.scorer[0].weight.zero_()
        policy.scorer[0].bias.zero_()
    s, cand, mask = torch.zeros(1, 2), torch.zeros(1, 3, 2), torch.tensor([[True, True, False]])
    torch.testing.assert_close(policy.log_probs(s, cand, mask, torch.tensor([[3.0, 1.0, 0.0]])).exp(), torch.tensor([[0.75, 0.25, 1.0]]))
    assert policy.act(s, cand, mask, torch.tensor([[1.0, 2.0, 0.0]])).item() == 1  # the more-drawn candidate wins a tie in g
    with torch.no_grad():  # g = [0, log 4]: exp g·n = [3, 4] → the scorer overrides π_β's 3:1 preference
        policy.scorer[0].weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    cand[0, 1, 0] = math.log(4.0)
    torch.testing.assert_close(policy.log_probs(s, cand, mask, torch.tensor([[3.0, 1.0, 0.0]])).exp(), torch.tensor([[3 / 7, 4 / 7, 1.0]]))
    with pytest.raises(DigiqError, match="cand_count"):
        policy.logits(s, cand, mask, None)
    plain = CandidatePolicy(2, 2, ActorParams(hidden=(), behavior_prior=False))
    with torch.no_grad():
        plain.scorer[0].weight.zero_()
        plain.scorer[0].bias.zero_()
    torch.testing.assert_close(plain.log_probs(s, cand, mask, None).exp(), torch.tensor([[0.5, 0.5, 1.0]]))  # counts ignored


def test_methods_needing_a_critic_refuse_without_one():
    with pytest.raises(DigiqError, match="method: method 'awr' needs the critic"):
        method_weights(actor_record(ActorParams(), "awr"), tiny_data([True]), None, torch.Generator())


@pytest.fixture(scope="module")
def toy():
    data = toy_transitions(300, seed=0)
    critic, _ = train_critic(data, CriticParams(updates=500, hidden=[64, 64], device="cpu"), gamma=0.95, seed=0)  # toy_transitions' γ
    return data, critic


ACTOR = ActorParams(n=4, updates=300, hidden=[64], anchor=0.0, device="cpu")  # the rule itself, unanchored


def test_best_of_n_on_toy_mdp_imitates_the_critics_choice_and_is_deterministic(toy, tmp_path):
    data, critic = toy
    policy, metrics, history = train_actor(data, ACTOR, critic=critic)
    again, metrics_again, _ = train_actor(data, ACTOR, critic=critic)
    assert metrics == metrics_again
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), again.state_dict().values()))
    assert 0.2 < metrics["frac_states_kept"] < 1.0 and metrics["mean_advantage_kept"] > ACTOR.threshold
    assert history[-1]["loss"] < history[0]["loss"] and metrics["agreement"] > 0.9
    # probability mass on the critic's best candidate: Best-of-N ≫ BC, which copies π_β's mix
    # (measured: 0.93 vs 0.53; π_β takes the right action 60 % of the time)
    bc, _, _ = train_actor(data, ACTOR, critic=critic, method="bc")
    q_best = first_argmax(candidate_q(critic, data)).unsqueeze(1)
    mass = {name: pi.log_probs(data.s, data.cand_sa, data.cand_mask, data.cand_count).exp().gather(1, q_best).mean().item()
            for name, pi in (("digiq", policy), ("bc", bc))}
    assert mass["digiq"] > 0.85 and mass["bc"] < 0.7
    chosen = policy.act(data.s, data.cand_sa, data.cand_mask, data.cand_count)
    policy.save_pretrained(tmp_path / "policy")
    loaded = CandidatePolicy.from_pretrained(tmp_path / "policy")
    assert loaded.config == policy.config
    assert torch.equal(loaded.act(data.s, data.cand_sa, data.cand_mask, data.cand_count), chosen)


@pytest.mark.parametrize("method", ["bc", "filtered-bc", "awr", "reinforce"])
def test_every_baseline_trains_on_the_toy_mdp(toy, method):
    data, critic = toy
    _, metrics, history = train_actor(data, ACTOR.model_copy(update={"updates": 100}), critic=critic, method=method)
    assert math.isfinite(history[-1]["loss"]) and metrics["n_states"] == len(data)
    assert metrics["frac_states_kept"] == (pytest.approx(data.traj_success.float().mean().item()) if method == "filtered-bc" else 1.0)


def test_the_split_first_layer_scores_like_the_concatenated_input():
    torch.manual_seed(0)
    policy = CandidatePolicy(3, 4, ActorParams(hidden=(5, 5)))
    s, cand_sa, mask = torch.randn(2, 3), torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)
    concatenated = torch.cat([s.unsqueeze(1).expand(-1, 6, -1), cand_sa], dim=-1)
    torch.testing.assert_close(policy.logits(s, cand_sa, mask, mask.float()), policy.scorer(concatenated).squeeze(-1))


def test_only_valid_candidates_are_scored_and_they_score_as_in_the_full_batch():
    """Masked slots are skipped (0 from ``scores``, −inf in the logits); valid ones equal the unmasked computation,
    and so do the gradients that reach the weights through them."""
    torch.manual_seed(0)
    policy = CandidatePolicy(3, 4, ActorParams(hidden=(5,), behavior_prior=False))
    s, cand_sa = torch.randn(2, 3), torch.randn(2, 6, 4)
    mask = torch.tensor([[True, False, True, False, False, True], [True, True, False, False, False, False]])
    full = policy.scores(s, cand_sa)
    masked = policy.scores(s, cand_sa, mask)
    torch.testing.assert_close(masked[mask], full[mask], rtol=0, atol=1e-6)
    assert torch.equal(masked[~mask], torch.zeros(int((~mask).sum())))
    assert torch.isneginf(policy.logits(s, cand_sa, mask, None)[~mask]).all()

    def first_layer_grad(scores: torch.Tensor) -> torch.Tensor:
        policy.zero_grad()
        (scores * mask).square().sum().backward()
        return policy.scorer[0].weight.grad.clone()

    torch.testing.assert_close(first_layer_grad(policy.scores(s, cand_sa, mask)), first_layer_grad(policy.scores(s, cand_sa)))


def test_training_is_bit_identical_at_full_size_with_two_threads():
    """Default widths and batch, two threads: big enough for torch's parallel CPU kernels, where the backward of
    plain advanced indexing (``x[rows]``, an accumulating scatter) differed from run to run on the default data."""
    data = toy_transitions(200, k=16, d=32, seed=1)
    data.cand_mask = torch.rand(data.cand_mask.shape, generator=torch.Generator().manual_seed(0)) < 0.7  # ragged sets,
    data.cand_mask[:, 0] = True  # as after de-duplication: a state's rows rarely split evenly between the threads
    params = ActorParams(updates=10, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [train_actor(data, params, method="bc")[0].state_dict() for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0][k], run[k]) for run in runs[1:] for k in runs[0])


def test_standardized_policy_scores_standardized_inputs_and_reloads_with_its_scaling(toy, tmp_path):
    """With ``standardize`` the scorer sees (x − μ)/σ of f(s) and of the valid f(s, a), μ and σ from the training
    states; the split first layer still equals the concatenated input, and a saved policy reloads with the scaling."""
    data, critic = toy
    policy, _, _ = train_actor(data, ACTOR.model_copy(update={"updates": 20, "standardize": True}), method="bc")
    valid = data.cand_sa[data.cand_mask]
    torch.testing.assert_close(policy.norm_sa.mean, valid.mean(0))
    torch.testing.assert_close(policy.norm_s.std, data.s.std(0, unbiased=False).clamp_min(1e-6))
    z_s, z_sa = policy.norm_s(data.s), policy.norm_sa(data.cand_sa)
    concatenated = torch.cat([z_s.unsqueeze(1).expand(-1, z_sa.shape[1], -1), z_sa], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(policy.scores(data.s, data.cand_sa), policy.scorer(concatenated).squeeze(-1))
    policy.save_pretrained(tmp_path / "p")
    loaded = CandidatePolicy.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded.norm_s.mean, policy.norm_s.mean)
    assert torch.equal(loaded.act(data.s, data.cand_sa, data.cand_mask, data.cand_count),
                       policy.act(data.s, data.cand_sa, data.cand_mask, data.cand_count))


def test_packed_candidates_move_valid_ones_first_and_drop_empty_columns():
    mask = torch.tensor([[True, False, True, False], [True, True, False, False]])
    sa = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    data = Transitions(s=torch.zeros(2, 3), sa=sa[:, 0], s_next=torch.zeros(2, 3), reward=torch.zeros(2),
                       done=torch.zeros(2), mc_return=torch.zeros(2), cand_sa=sa, cand_mask=mask,
                       cand_count=torch.tensor([[2.0, 0.0, 5.0, 0.0], [1.0, 3.0, 0.0, 0.0]]))
    adv = torch.tensor([[0.25, 9.0, 0.5, 9.0], [1.5, 2.0, 9.0, 9.0]])
    packed, packed_adv, none = packed_candidates(data, adv, None)
    assert packed.cand_mask.tolist() == [[True, True], [True, True]] and none is None
    assert packed.cand_sa.tolist() == [[sa[0, 0].tolist(), sa[0, 2].tolist()], [sa[1, 0].tolist(), sa[1, 1].tolist()]]
    assert packed.cand_count.tolist() == [[2.0, 5.0], [1.0, 3.0]] and packed_adv.tolist() == [[0.25, 0.5], [1.5, 2.0]]
    assert torch.equal(packed.sa, data.sa) and torch.equal(packed.s, data.s)  # the dataset action stays column 0
