"""Policy extraction as the official trainer does it: a fresh Best-of-N subset per update, the clamped argmax rules
(digiq, awr-bon, pg-bon) by hand, the actor starting at π_β, its KL to π_β by hand, and the anchor."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import toy_transitions
from digiq.actor import CandidatePolicy, actor_record, anchor_penalty, imitation_loss, train_actor
from digiq.config import ActorParams, CriticParams
from digiq.critic import train_critic
from digiq.errors import DigiqError
from digiq.extraction_weights import BatchWeights, awr_bon_weights, best_of_n_weights, draw_owners, pg_bon_weights

torch.set_num_threads(1)


def draw_rows(method: str, seed: int, calls: int = 2, **params) -> list[torch.Tensor]:
    """The imitated candidate of 50 states × 8 valid candidates, A increasing with k (so k* = the subset's largest
    index), over ``calls`` successive draws of one BatchWeights seeded ``seed``."""
    mask = torch.ones(50, 8, dtype=torch.bool)
    adv = torch.linspace(0.2, 0.9, 8).expand(50, 8)
    draws = BatchWeights(actor_record(ActorParams(n=3, **params), method), mask, mask.float(), None, adv,
                         torch.Generator().manual_seed(seed))
    return [draws(torch.arange(50)).imitated for _ in range(calls)]


@pytest.mark.parametrize("method", ["digiq", "awr-bon", "pg-bon"])
def test_each_update_draws_a_fresh_subset_and_the_same_seed_repeats_them(method):
    first, second = draw_rows(method, seed=0)
    assert not torch.equal(first, second)  # two updates, two subsets
    again = draw_rows(method, seed=0)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])  # same seed, same sequence of subsets
    assert not torch.equal(first, draw_rows(method, seed=1)[0])


def test_reinforce_weighs_a_fresh_subset_per_update_too():
    mask = torch.ones(50, 8, dtype=torch.bool)
    draws = BatchWeights(actor_record(ActorParams(n=3), "reinforce"), mask, mask.float(), None, torch.randn(50, 8),
                         torch.Generator().manual_seed(0))
    a, b = draws(torch.arange(50)).weights, draws(torch.arange(50)).weights
    assert not torch.equal(a != 0, b != 0) and (a != 0).sum(dim=1).le(3).all()


def test_fixed_weight_methods_give_the_same_weights_every_update():
    mask = torch.ones(4, 3, dtype=torch.bool)
    draws = BatchWeights(actor_record(ActorParams(), "awr"), mask, None, None, torch.tensor([[0.1, 0.9, 0.9]] * 4),
                         torch.Generator().manual_seed(0))
    assert torch.equal(draws(torch.arange(4)).weights, draws(torch.arange(4)).weights)
    assert not draws.per_update


def test_draw_owners_lists_each_draw_but_the_dataset_actions_own():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    count = torch.tensor([[2.0, 3.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert draw_owners(mask, count).tolist() == [[0, 1, 1, 1, 2], [-1, -1, -1, -1, -1]]


def test_best_of_n_clamps_the_argmax_advantage_before_the_threshold():
    adv = torch.tensor([
        [0.05, 1.70, 0.20],   # k* = 1, clamp(1.7) = 1.0: not > 1.0                 → nothing kept at threshold 1
        [-0.3, -0.2, -0.9],   # k* = 1 (−0.2 is the largest), clamp → 0               → nothing kept
        [0.00, 0.50, 0.90],   # candidate 2 outside the subset: k* = 1, 0.5 > 0.4      → kept at 0.4, not at 1
    ])
    subset = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    w, best = best_of_n_weights(adv, subset, threshold=0.4)
    assert best.tolist() == [1, 1, 1] and w.tolist() == [[0, 1, 0], [0, 0, 0], [0, 1, 0]]
    w, _ = best_of_n_weights(adv, subset, threshold=1.0)
    assert w.eq(0).all()  # the clamp caps A* at 1: a threshold of 1 keeps nothing, however large A is
    w, _ = best_of_n_weights(adv, subset, threshold=-0.5)
    assert w.tolist() == [[0, 1, 0], [0, 1, 0], [0, 1, 0]]  # clamp(−0.2) = 0 > −0.5: kept


def test_awr_bon_and_pg_bon_weigh_the_clamped_argmax_by_hand():
    adv = torch.tensor([[0.10, 0.30, 0.00], [-0.5, -0.4, -0.6], [0.20, 2.00, 0.00]])
    subset = torch.ones(3, 3, dtype=torch.bool)
    # awr-bon, β = 0.5, cap 5: k* = 1, 1, 1; clamp(A*) = 0.3, 0, 1 → exp(0.6) = 1.8221, exp(0) = 1, exp(2) = 7.389 → 5
    w, best = awr_bon_weights(adv, subset, beta=0.5, max_weight=5.0)
    assert best.tolist() == [1, 1, 1]
    torch.testing.assert_close(w, torch.tensor([[0.0, math.exp(0.6), 0.0], [0.0, 1.0, 0.0], [0.0, 5.0, 0.0]]))
    # pg-bon, multiplier 5: 5 · (0.3, 0, 1) = 1.5, 0, 5
    w, _ = pg_bon_weights(adv, subset, multiplier=5.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]]))


def test_a_fresh_policy_is_pi_beta_exactly():
    torch.manual_seed(0)
    policy = CandidatePolicy(3, 4, ActorParams(hidden=[8, 8]))
    s, cand_sa = torch.randn(2, 3), torch.randn(2, 4, 4)
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    count = torch.tensor([[5.0, 2.0, 1.0, 0.0], [1.0, 0.0, 6.0, 1.0]])
    assert torch.equal(policy.scores(s, cand_sa, mask), torch.zeros(2, 4))  # g ≡ 0
    expected = torch.tensor([[5 / 8, 2 / 8, 1 / 8, 0.0], [1 / 8, 0.0, 6 / 8, 1 / 8]])
    torch.testing.assert_close(policy.log_probs(s, cand_sa, mask, count).exp() * mask, expected, rtol=0, atol=1e-7)
    assert policy.kl_to_prior(s, cand_sa, mask, count).abs().max() < 1e-7


def test_kl_to_pi_beta_by_hand():
    policy = CandidatePolicy(2, 2, ActorParams(hidden=()))
    with torch.no_grad():  # g(s, a) = x_Q[0]
        policy.scorer[0].weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    s, mask = torch.zeros(1, 2), torch.tensor([[True, True, False]])
    cand = torch.zeros(1, 3, 2)
    cand[0, 1, 0] = math.log(4.0)  # g = [0, log 4]; n = [3, 1]: π = [3/7, 4/7], π_β = [3/4, 1/4]
    kl = policy.kl_to_prior(s, cand, mask, torch.tensor([[3.0, 1.0, 0.0]]))
    expected = 3 / 7 * math.log((3 / 7) / (3 / 4)) + 4 / 7 * math.log((4 / 7) / (1 / 4))  # = 0.2330
    assert kl.item() == pytest.approx(expected, rel=1e-5)


def test_the_anchor_pulls_g_back_to_zero_where_nothing_is_imitated():
    torch.manual_seed(0)
    policy = CandidatePolicy(3, 4, ActorParams(hidden=[8]))
    with torch.no_grad():
        policy.scorer[-1].weight.normal_()  # a policy that has moved away from π_β
    s, cand_sa, mask = torch.randn(16, 3), torch.randn(16, 5, 4), torch.ones(16, 5, dtype=torch.bool)
    no_weight = torch.zeros(16, 5)
    start = anchor_penalty(policy.scores(s, cand_sa, mask), mask).item()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(300):
        g = policy.scores(s, cand_sa, mask)
        loss = imitation_loss(torch.log_softmax(g, dim=-1), no_weight) + 1.0 * anchor_penalty(g, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert start > 0.1 and anchor_penalty(policy.scores(s, cand_sa, mask), mask).item() < 1e-4


def test_with_no_weight_anywhere_training_leaves_pi_at_pi_beta():
    data = toy_transitions(40, seed=0)
    adv = torch.full(data.cand_mask.shape, 5.0)  # clamp(5) = 1, not > threshold 1: Best-of-N keeps nothing
    policy, metrics, _ = train_actor(data, ActorParams(n=4, threshold=1.0, anchor=0.5, updates=20, hidden=[16], device="cpu"),
                                     advantages=adv)
    assert metrics["n_kept"] == 0 and metrics["frac_states_kept"] == 0.0
    assert torch.equal(policy.scores(data.s, data.cand_sa, data.cand_mask), torch.zeros(data.cand_mask.shape))
    assert metrics["kl_prior_never_kept"] == 0.0


@pytest.fixture(scope="module")
def toy():
    data = toy_transitions(300, seed=0)
    critic, _ = train_critic(data, CriticParams(updates=500, hidden=[64, 64], device="cpu"), gamma=0.95, seed=0)
    return data, critic


def test_the_anchor_keeps_never_kept_states_nearer_pi_beta_and_held_out_states_are_measured(toy):
    data, critic = toy
    held_out = torch.zeros(len(data.s), dtype=torch.bool)
    held_out[::5] = True
    params = ActorParams(n=4, threshold=0.3, updates=200, hidden=[64], device="cpu")
    runs = {anchor: train_actor(data, params.model_copy(update={"anchor": anchor}), critic=critic, held_out=held_out)[1]
            for anchor in (0.0, 1.0)}
    free, anchored = runs[0.0], runs[1.0]
    assert free["n_states"] == anchored["n_states"] == int((~held_out).sum())
    assert free["n_heldout"] == int(held_out.sum()) and 0 < free["heldout_frac_kept"] < 1
    assert 0 < free["n_kept"] < free["n_states"]
    assert anchored["kl_prior_never_kept"] < free["kl_prior_never_kept"]
    assert anchored["kl_prior_heldout"] < free["kl_prior_heldout"]
    assert all(math.isfinite(m["heldout_target_ce"]) for m in runs.values())


def test_precomputed_weights_train_the_digirl_method_and_only_it():
    data = toy_transitions(40, seed=0)
    weights = torch.zeros(data.cand_mask.shape)
    weights[::2, 0] = 1.0
    _, metrics, _ = train_actor(data, ActorParams(updates=10, hidden=[8], device="cpu"), method="digirl", weights=weights)
    assert metrics["n_kept"] == (len(data.s) + 1) // 2 and metrics["frac_imitated_not_dataset"] == 0.0
    with pytest.raises(DigiqError, match="precomputed"):
        train_actor(data, ActorParams(updates=10, device="cpu"), method="digirl")
    with pytest.raises(DigiqError, match="computes its own weights"):
        train_actor(data, ActorParams(updates=10, device="cpu"), method="bc", weights=weights)
