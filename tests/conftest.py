"""Fixtures shared by the test modules: a toy MDP's transitions for the critic and actor tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from digiq.critic import Transitions


def toy_transitions(episodes: int = 400, *, steps: int = 3, k: int = 8, d: int = 8, p_correct: float = 0.6,
                    gamma: float = 0.95, seed: int = 0, mdp_seed: int = 0) -> Transitions:
    """A tiny MDP where the action matters (critic and actor tests).

    Each episode must take ``steps`` correct actions in a row; at every state exactly one of ``k``
    candidates is correct (its action features lean along a fixed hidden direction). π_β picks it with
    probability ``p_correct``; a wrong action ends the episode with reward 0, the last correct one gives
    reward 1. f(s) = embedding of the step index + noise; f(s, a) = [f(s), action features] (d_sa = 2d).
    ``mdp_seed`` fixes the MDP (step embeddings, the hidden direction), ``seed`` the sampled episodes.
    """
    import torch

    from digiq.critic import Transitions

    g = torch.Generator().manual_seed(mdp_seed)
    step_emb = torch.randn(steps + 1, d, generator=g)
    good_dir = torch.randn(d, generator=g)
    g.manual_seed(seed + 1_000_003)
    rows: dict[str, list] = {name: [] for name in ("s", "sa", "s_next", "reward", "done", "cand_sa", "episode")}
    for ep in range(episodes):
        t = 0
        while True:
            s = step_emb[t] + 0.1 * torch.randn(d, generator=g)
            actions = torch.randn(k, d, generator=g)
            actions[0] += 1.5 * good_dir  # candidate 0 before shuffling is the correct one
            correct = bool(torch.rand(1, generator=g) < p_correct)
            chosen = 0 if correct else int(torch.randint(1, k, (1,), generator=g))
            order = [chosen] + [i for i in torch.randperm(k, generator=g).tolist() if i != chosen]
            cand = torch.cat([s.expand(k, d), actions[order]], dim=1)
            t_next = t + 1 if correct else t
            ends = (not correct) or t_next == steps
            rows["s"].append(s); rows["sa"].append(cand[0]); rows["cand_sa"].append(cand)
            rows["s_next"].append(step_emb[t_next] + 0.1 * torch.randn(d, generator=g))
            rows["reward"].append(float(correct and t_next == steps)); rows["done"].append(float(ends))
            rows["episode"].append(ep)
            t = t_next
            if ends:
                break
    reward, done = torch.tensor(rows["reward"]), torch.tensor(rows["done"])
    episode = torch.tensor(rows["episode"])
    mc_return = _discounted_returns(reward, done, gamma)
    success = torch.zeros(episodes, dtype=torch.bool).index_put_((episode[reward > 0],), torch.tensor(True))
    return Transitions(s=torch.stack(rows["s"]), sa=torch.stack(rows["sa"]), s_next=torch.stack(rows["s_next"]),
                       reward=reward, done=done, mc_return=mc_return, cand_sa=torch.stack(rows["cand_sa"]),
                       traj_success=success[episode], source="toy_transitions")


def _discounted_returns(reward: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    import torch

    """G_t = r_t + γ (1 − done_t) G_{t+1}, over consecutive rows of whole episodes."""
    out, g = torch.zeros_like(reward), 0.0
    for i in range(len(reward) - 1, -1, -1):
        g = reward[i].item() + gamma * (1.0 - done[i].item()) * g
        out[i] = g
    return out
