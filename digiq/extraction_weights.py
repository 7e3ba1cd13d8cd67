"""Policy extraction's imitation weights: which candidate each state imitates, and how much.

Every method turns the data (and the critic's advantages A(s, a_k) = max(Q1, Q2)(s, a_k) − max(V1, V2)(s), computed
once from the frozen critic on the critic's own inputs) into a weight matrix W [B, K] over a state's candidates:

    bc           W[b, 0] = 1                                    (the dataset action, every state)
    filtered-bc  W[b, 0] = 1 if the trajectory succeeded         (successful trajectories only)
    awr          W[b, 0] = min(exp(A(s_b, a_0) / β), w_max)      (the dataset action; the paper's AWR)
    digirl       W given (DigiRL's advantage-filtered update, :mod:`digiq.digirl`)

and, per update, on a fresh Best-of-N subset S_b (index 0 plus N − 1 further draws of π_β, below):

    k*  = argmax_{k ∈ S_b} A(s_b, a_k)        (ties: the lowest index, so the dataset action wins every tie)
    A*  = clamp(A(s_b, a_k*), 0, 1)
    digiq        W[b, k*] = 1 if A* > threshold                  (official best-of-n; threshold 0.10)
    awr-bon      W[b, k*] = min(exp(A* / β), w_max)              (official awr; the official code has no w_max:
                                                                  exp(1/β) reaches e^20 at β = 0.05)
    pg-bon       W[b, k*] = A* · multiplier                     (official pg)
    reinforce    W[b, k] = A(s_b, a_k) for every k ∈ S_b          (unclamped, negative terms included, as in the paper)

These are ``actor_loss`` of DigiRL-agent/digiq (digiq/algorithms/digiq/trainer.py): ``best-of-n``, ``awr`` and ``pg``.

The N-subset is drawn afresh for every batch, as the official trainer does (``random.sample(range(K), N)`` with index
0 forced in): the same state meets different candidate subsets in different updates. The official code draws N of
the K candidate *slots*, and its K slots are K draws of π_β; here candidates are de-duplicated (``cand_count[b, k]`` =
how many of π_β's draws candidate k stands for), so drawing N − 1 of a state's other draws uniformly without
replacement and keeping the distinct candidates among them is the same draw: frequent actions are proposed more
often than rare ones, in proportion to π_β's draw counts. (The official code draws one set of slots per batch, shared
by its states; here each state draws its own, which has the same distribution per state.) Same seed, same subsets.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pydantic import BaseModel

from digiq.critic import Transitions, first_argmax
from digiq.errors import DigiqError

PER_UPDATE = ("digiq", "awr-bon", "pg-bon", "reinforce")  # a fresh N-subset, hence fresh weights, per update
BEST_OF_N = ("digiq", "awr-bon", "pg-bon")  # weigh the argmax-advantage candidate of the subset
NEEDS_ADVANTAGE = ("digiq", "awr", "awr-bon", "pg-bon", "reinforce")
GIVEN = ("digirl",)  # W comes precomputed (``weights``)


# ----------------------------------------------------------------------------------------------- the N-subset


def draw_owners(cand_mask: torch.Tensor, cand_count: torch.Tensor) -> torch.Tensor:
    """[B, D] long: the candidate index of each of a state's π_β draws other than the dataset action's own
    (−1 pads rows with fewer than D). Candidate k appears ``cand_count[b, k]`` times (once at least when valid),
    the dataset action ``cand_count[b, 0] − 1`` times."""
    counts = torch.where(cand_mask, cand_count.round().long().clamp(min=1), 0)
    counts[:, 0] = (counts[:, 0] - 1).clamp(min=0)
    ends = counts.cumsum(dim=1)  # draw j belongs to the first k with j < ends[b, k]
    width = max(int(ends[:, -1].max()) if len(ends) else 0, 1)
    position = torch.arange(width).expand(len(counts), width).contiguous()
    owner = torch.searchsorted(ends, position, right=True)
    return owner.masked_fill(position >= ends[:, -1:], -1)


def sample_from_owners(owners: torch.Tensor, cand_mask: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """[B, K] bool: index 0 plus the candidates of N − 1 draws taken uniformly without replacement from ``owners``
    (:func:`draw_owners`; all of them when fewer)."""
    b, k = cand_mask.shape
    subset = torch.zeros(b, k + 1, dtype=torch.bool)
    if n > 1:
        keys = torch.rand(owners.shape, generator=generator).masked_fill(owners < 0, 2.0)
        picked = keys.topk(min(n - 1, owners.shape[1]), dim=1, largest=False).indices
        real = keys.gather(1, picked) < 2.0
        subset.scatter_(1, torch.where(real, owners.gather(1, picked), k), True)
    subset = subset[:, :k]
    subset[:, 0] = True
    return subset & cand_mask


def sample_n_subset(cand_mask: torch.Tensor, cand_count: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """[B, K] bool: the distinct candidates among N draws of π_β — the dataset action (index 0, always) plus N − 1 of
    the state's other draws, uniformly without replacement (all when fewer); a candidate is in when any of its draws
    is. With one draw per candidate this is N − 1 of the other candidates, uniformly. Each call draws afresh."""
    return sample_from_owners(draw_owners(cand_mask.cpu(), cand_count.cpu()), cand_mask.cpu(), n, generator)


# ----------------------------------------------------------------------------------------------- the rules


def best_of_n(adv: torch.Tensor, subset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k* [B], A* [B]): the subset's argmax-advantage candidate (ties: lowest index) and its advantage clamped to [0, 1]."""
    best = first_argmax(adv.masked_fill(~subset, math.nan))
    return best, adv.gather(1, best.unsqueeze(1)).squeeze(1).clamp(0.0, 1.0)


def on_candidate(best: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """[B, K] zeros with ``values[b]`` at column ``best[b]``."""
    return torch.zeros(len(best), k, dtype=values.dtype).scatter_(1, best.unsqueeze(1), values.unsqueeze(1))


def best_of_n_weights(adv: torch.Tensor, subset: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W[b, k*] = 1 where clamp(A(s_b, a_k*), 0, 1) > threshold (official best-of-n). Returns (W [B, K], k* [B])."""
    best, clamped = best_of_n(adv, subset)
    return on_candidate(best, (clamped > threshold).to(adv.dtype), adv.shape[1]), best


def awr_bon_weights(adv: torch.Tensor, subset: torch.Tensor, beta: float, max_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W[b, k*] = min(exp(clamp(A*, 0, 1) / β), w_max) (official awr, with a cap). Returns (W, k*)."""
    best, clamped = best_of_n(adv, subset)
    return on_candidate(best, awr_weights(clamped, beta, max_weight), adv.shape[1]), best


def pg_bon_weights(adv: torch.Tensor, subset: torch.Tensor, multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W[b, k*] = clamp(A*, 0, 1) · multiplier (official pg). Returns (W, k*)."""
    best, clamped = best_of_n(adv, subset)
    return on_candidate(best, clamped * multiplier, adv.shape[1]), best


def awr_weights(adv0: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """w = min(exp(A / β), w_max) for each state [B]."""
    return torch.exp(adv0 / beta).clamp(max=max_weight)


def reinforce_weights(adv: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """W[b, k] = A(s_b, a_k) on the sampled subset, 0 elsewhere (negative advantages push log π down)."""
    return torch.where(subset, adv, torch.zeros_like(adv))


def imitated_of(weights: torch.Tensor) -> torch.Tensor:
    """[B] the candidate with the largest weight (ties: lowest index; 0 where a row has none)."""
    return first_argmax(weights.masked_fill(weights == 0, math.nan))


# ----------------------------------------------------------------------------------------------- per batch


class Draw(NamedTuple):
    weights: torch.Tensor  # W [b, K]
    imitated: torch.Tensor  # the candidate each state imitates most [b]


class BatchWeights:
    """W for batches of rows: fixed per state (bc, filtered-bc, awr, digirl) or drawn afresh on every call, from a
    fresh N-subset per state (digiq, awr-bon, pg-bon, reinforce). ``config`` is an actor record (method, n, threshold,
    awr_beta, awr_max_weight, pg_multiplier); tensors live on the CPU, where ``generator`` draws."""

    def __init__(self, config: BaseModel, cand_mask: torch.Tensor, cand_count: torch.Tensor | None,
                 traj_success: torch.Tensor | None, adv: torch.Tensor | None, generator: torch.Generator,
                 weights: torch.Tensor | None = None):
        self.config, self.generator = config, generator
        self.method = config.method
        self.mask = cand_mask.cpu()
        self.adv = None if adv is None else adv.detach().float().cpu()
        if self.method in NEEDS_ADVANTAGE and self.adv is None:
            raise DigiqError(f"method {self.method!r} needs the critic's advantages", field="method")
        if (weights is not None) != (self.method in GIVEN):
            raise DigiqError(f"method {self.method!r} " + ("takes its weights precomputed: pass them" if weights is None
                             else "computes its own weights: precomputed ones are for " + ", ".join(GIVEN)), field="weights")
        if self.adv is not None and self.adv.shape != self.mask.shape:
            raise DigiqError(f"advantages of shape {tuple(self.adv.shape)} for candidates {tuple(self.mask.shape)}", field="advantages")
        self.per_update = self.method in PER_UPDATE
        count = self.mask.float() if cand_count is None else cand_count.cpu()
        self.owners = draw_owners(self.mask, count) if self.per_update else None
        self.fixed = None if self.per_update else self._fixed(traj_success, weights)

    def _fixed(self, traj_success: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor:
        b, k = self.mask.shape
        if self.method == "digirl":
            if weights.shape != (b, k):
                raise DigiqError(f"precomputed weights of shape {tuple(weights.shape)} for candidates {(b, k)}", field="weights")
            return weights.detach().float().cpu()
        first = torch.zeros(b, k)
        if self.method == "bc":
            first[:, 0] = 1.0
        elif self.method == "filtered-bc":
            if traj_success is None:
                raise DigiqError("filtered-bc needs each transition's trajectory outcome", field="traj_success")
            first[:, 0] = traj_success.float().cpu()
        else:  # awr
            first[:, 0] = awr_weights(self.adv[:, 0], self.config.awr_beta, self.config.awr_max_weight)
        return first

    def __call__(self, rows: torch.Tensor) -> Draw:
        """W for the states ``rows`` (CPU long [b]); a fresh subset per call for the per-update methods."""
        if not self.per_update:
            weights = self.fixed.index_select(0, rows)
            return Draw(weights, imitated_of(weights))
        c = self.config
        subset = sample_from_owners(self.owners.index_select(0, rows), self.mask.index_select(0, rows), c.n, self.generator)
        adv = self.adv.index_select(0, rows)
        if self.method == "reinforce":
            weights = reinforce_weights(adv, subset)
            return Draw(weights, imitated_of(weights))
        if self.method == "digiq":
            return Draw(*best_of_n_weights(adv, subset, c.threshold))
        if self.method == "awr-bon":
            return Draw(*awr_bon_weights(adv, subset, c.awr_beta, c.awr_max_weight))
        return Draw(*pg_bon_weights(adv, subset, c.pg_multiplier))

    def all_rows(self) -> Draw:
        return self(torch.arange(len(self.mask)))


def selection_metrics(method: str, draw: Draw, adv: torch.Tensor | None) -> dict[str, float]:
    """Kept states and what they imitate, for one draw: frac_states_kept, frac_imitated_not_dataset (not reinforce),
    mean_advantage_kept (Σ w·A / Σ w over the imitated actions; reinforce: mean A of the sampled pairs) and
    frac_negative_weights (reinforce)."""
    weights, imitated = draw
    kept = (weights != 0).any(dim=1)
    out = {"frac_states_kept": kept.float().mean().item()}
    if method != "reinforce":
        out["frac_imitated_not_dataset"] = (imitated[kept] != 0).float().mean().item() if kept.any() else math.nan
    if adv is not None:
        if method == "reinforce":  # every sampled (state, candidate) pair carries its advantage
            sampled = weights[weights != 0]
            out["mean_advantage_kept"] = sampled.mean().item() if len(sampled) else math.nan
            out["frac_negative_weights"] = (sampled < 0).float().mean().item() if len(sampled) else math.nan
        else:
            w = weights.gather(1, imitated.unsqueeze(1)).squeeze(1)
            a = adv.gather(1, imitated.unsqueeze(1)).squeeze(1)
            out["mean_advantage_kept"] = ((w * a).sum() / w.sum()).item() if w.sum() > 0 else math.nan
    return out


class SelectionTally:
    """Means over updates of :func:`selection_metrics` (NaN entries skipped) and the states kept at least once."""

    def __init__(self, method: str, n_states: int):
        self.method, self.n_states = method, n_states
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.ever_kept = torch.zeros(n_states, dtype=torch.bool)

    def add(self, rows: torch.Tensor, draw: Draw, adv: torch.Tensor | None) -> None:
        self.ever_kept[rows[(draw.weights != 0).any(dim=1)]] = True
        for key, value in selection_metrics(self.method, draw, adv).items():
            if not math.isnan(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def metrics(self, keys: tuple[str, ...]) -> dict[str, float]:
        """n_states, n_kept (states kept in some update) and the means of ``keys`` (NaN when never measured)."""
        means = {key: self.sums[key] / self.counts[key] if self.counts.get(key) else math.nan for key in keys}
        return {"n_states": self.n_states, "n_kept": int(self.ever_kept.sum()), **means}


def method_weights(config: BaseModel, data: Transitions, adv: torch.Tensor | None, generator: torch.Generator,
                   weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One draw of ``config.method``'s weights over every state of ``data``, and its selection metrics."""
    data.require("cand_sa", "cand_mask")
    draw = BatchWeights(config, data.cand_mask, data.cand_count, data.traj_success, adv, generator, weights).all_rows()
    kept = (draw.weights != 0).any(dim=1)
    return draw.weights, {"n_states": len(kept), "n_kept": int(kept.sum()),
                          **selection_metrics(config.method, draw, None if adv is None else adv.float().cpu())}
