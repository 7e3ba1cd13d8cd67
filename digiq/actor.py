"""Policy extraction on frozen features: Best-of-N (Digi-Q) and the paper's baselines.

The policy scores a state's candidate actions and acts through a softmax over the valid ones:

    g(s, a_k) = MLP([f(s), f(s, a_k)])      (or MLP(f(s, a_k)) without the state)
    π(k | s)  = n_k · exp g(s, a_k) / Σ_j n_j · exp g(s, a_j)     over k with cand_mask[s, k]

n_k (``cand_count``) is how many of π_β's draws at s do what a_k does (same semantic key; candidates are
de-duplicated by it). This is the softmax over the raw draws, with draws of one class pooled:
π(a | s) = Σ_{k: key(a_k) = a} softmax(g)_k. π_β's preference is thus the prior: g ≡ 0 gives back the
empirical π_β, and the learned g only has to say where to depart from it. With ``behavior_prior: false``
every n_k is 1 (a plain softmax over the distinct candidates).

Every method is plain weighted imitation. It first turns the data (and the critic's advantages
A(s, a_k) = max(Q1, Q2)(s, a_k) − max(V1, V2)(s), see :func:`digiq.critic.advantage`) into a weight
matrix W [B, K], then minimises

    L = −(1/|batch|) Σ_b Σ_k W[b, k] · log π(k | s_b)      over states with some W[b, k] ≠ 0.

    bc           W[b, 0] = 1                                   (the dataset action, every state)
    filtered-bc  W[b, 0] = 1 if the trajectory succeeded        (successful trajectories only)
    digiq        the candidates of N draws of π_β, always with index 0;  k* = argmax A over them;
                 W[b, k*] = 1 if A(s_b, a_k*) > threshold       (Best-of-N; official threshold 0.10)
    awr          W[b, 0] = min(exp(A(s_b, a_0) / β), w_max)
    reinforce    W[b, k] = A(s_b, a_k) for the N sampled k      (negative terms included)

REINFORCE's loss is unbounded below when negative weights dominate (log π of a bad candidate → −∞):
the instability the paper attributes to negative gradients; it is kept as specified, not clamped.
(The official code differs for its baselines: it clamps A to [0, 1] and applies every loss to the
Best-of-N action; here AWR weighs the dataset action and REINFORCE keeps negative terms, as in the paper.)

Ties in Best-of-N go to the lowest candidate index (the dataset action, index 0, wins every tie).
The N-subset is drawn per state with a seeded generator: index 0 plus N−1 of the state's other π_β draws,
uniformly without replacement (all of them when fewer), each draw standing for its distinct candidate
(``cand_count``): frequent actions are proposed more often than rare ones, as in the paper's N samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from digiq.config import ActorParams, Method
from digiq.critic import DoubleCritic, LogFn, Transitions, advantage, first_argmax, record_model
from digiq.errors import DigiqError
from digiq.nn import (EpochSampler, RunningMeans, Standardize, load_pretrained, load_state, map_chunks, mlp,
                      resolve_device, save_pretrained, seeded_generator)
from digiq.progress import progress_bar

if TYPE_CHECKING:
    import pyarrow as pa

    from digiq.training_data import TrainingData

KIND = "digiq.policy"
METHODS: tuple[str, ...] = get_args(Method)
NEEDS_CRITIC = ("digiq", "awr", "reinforce")
SAVED = ("n", "threshold", "awr_beta", "awr_max_weight", "use_state", "behavior_prior", "hidden", "standardize", "lr",
         "grad_clip", "batch_size", "updates", "log_every", "device")
ActorRecord = record_model("ActorRecord", ActorParams, SAVED, top_level=("seed",),
                           method=(Method, Field("digiq", description="digiq (Best-of-N) | bc | filtered-bc | awr | reinforce")))


def actor_record(params: ActorParams | None = None, method: str = "digiq", seed: int | None = None) -> BaseModel:
    """What a policy extracted by ``method`` with ``params`` (defaults: the declared ones) and ``seed`` records."""
    if method not in METHODS:
        raise DigiqError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})", field="method")
    return ActorRecord(**(params or ActorParams()).model_dump(include=set(SAVED)), method=method,
                       **({} if seed is None else {"seed": seed}))


# ----------------------------------------------------------------------------------------------- the policy


class CandidatePolicy(nn.Module):
    """An MLP scorer over [f(s), f(s, a_k)] (or f(s, a_k)) → logits over a state's candidate set."""

    def __init__(self, d_s: int, d_sa: int, params: ActorParams | None = None, *, method: str = "digiq",
                 seed: int | None = None):
        super().__init__()
        self.config = actor_record(params, method, seed)
        self.d_s, self.d_sa = d_s, d_sa
        self.scorer = mlp(d_sa + (d_s if self.config.use_state else 0), self.config.hidden)
        self.norm_s, self.norm_sa = ((Standardize(d_s), Standardize(d_sa)) if self.config.standardize
                                     else (nn.Identity(), nn.Identity()))

    def fit_standardization(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor) -> None:
        """Fit the input layers (when ``standardize``): f(s) over the states, f(s, a) over their valid candidates."""
        if isinstance(self.norm_s, Standardize):
            self.norm_s.fit(s)
            self.norm_sa.fit(cand_sa[cand_mask])

    def scores(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor | None = None) -> torch.Tensor:
        """g(s, a_k) [B, K], computed only where ``cand_mask`` (default: everywhere) is True; 0 elsewhere.

        The first layer W·[f(s); f(s, a_k)] + b is computed as W_a·f(s, a_k) + (W_s·f(s) + b): the state's
        half once per state instead of once per candidate. Skipping the masked slots matters: a state has far fewer
        distinct candidates than K (docs/benchmarks.md).
        """
        if cand_mask is None:
            cand_mask = torch.ones(cand_sa.shape[:2], dtype=torch.bool, device=cand_sa.device)
        rows, cols = cand_mask.nonzero(as_tuple=True)
        first, rest = self.scorer[0], self.scorer[1:]
        pairs = self.norm_sa(cand_sa[rows, cols])
        if self.config.use_state:
            state_half = F.linear(self.norm_s(s), first.weight[:, :self.d_s], first.bias)
            hidden = F.linear(pairs, first.weight[:, self.d_s:]) + state_half.index_select(0, rows)
        else:
            hidden = first(pairs)
        return cand_sa.new_zeros(cand_mask.shape).index_put((rows, cols), rest(hidden).squeeze(-1))

    def logits(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor, cand_count: torch.Tensor | None) -> torch.Tensor:
        """[B, K] logits g(s, a_k) + log n_k (n_k = 1 without the behavior prior); invalid candidates get −inf."""
        logits = self.scores(s, cand_sa, cand_mask)
        if self.config.behavior_prior:
            if cand_count is None:
                raise DigiqError("this policy weighs candidates by π_β's draws (behavior_prior): pass how many draws each "
                                 "candidate stands for", field="cand_count")
            logits = logits + cand_count.clamp(min=1.0).log()
        return logits.masked_fill(~cand_mask, -math.inf)

    def log_probs(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor, cand_count: torch.Tensor | None) -> torch.Tensor:
        """log π(k | s) [B, K]; invalid candidates: 0 (never −inf, so 0 · log π stays 0)."""
        return F.log_softmax(self.logits(s, cand_sa, cand_mask, cand_count), dim=-1).masked_fill(~cand_mask, 0.0)

    @torch.no_grad()
    def act(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor, cand_count: torch.Tensor | None,
            mode: Literal["argmax", "sample"] = "argmax", generator: torch.Generator | None = None) -> torch.Tensor:
        """The chosen candidate index per state [B]: argmax (ties: lowest index) or a sample from π."""
        logits = self.logits(s, cand_sa, cand_mask, cand_count)
        if mode == "argmax":
            return first_argmax(logits)
        if mode == "sample":
            return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
        raise DigiqError(f"unknown mode {mode!r} (expected argmax or sample)", field="mode")

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(directory, self, kind=KIND, config=self.config, dims={"d_s": self.d_s, "d_sa": self.d_sa})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> CandidatePolicy:
        config, dims, state = load_pretrained(directory, kind=KIND, config_cls=ActorRecord)
        policy = cls(dims["d_s"], dims["d_sa"], ActorParams(**config.model_dump(include=set(SAVED))), method=config.method,
                     seed=config.seed)
        load_state(policy, state, directory)
        return policy.to(device).eval()


def imitation_loss(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = −mean_b Σ_k W[b, k] · log π(k | s_b)."""
    return -(weights * log_probs).sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------------- weights per method


def sample_n_subset(cand_mask: torch.Tensor, cand_count: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """[B, K] bool: the distinct candidates among N draws of π_β — the dataset action (index 0, always) plus N − 1 of
    the state's other draws, uniformly without replacement (all when fewer); a candidate is in when any of its draws
    is. ``cand_count[b, k]`` is how many draws candidate k stands for, the dataset action's own included, so common
    actions are likelier to be proposed than rare ones, as when the paper samples N actions from π_β. With one draw
    per candidate this is N − 1 of the other candidates, uniformly."""
    others = cand_count.round().long().masked_fill(~cand_mask, 0)
    others[:, 0] -= 1  # the dataset action's own draw is the one always taken
    b, k = others.shape
    slots = int(others.max().clamp(min=1))
    is_draw = torch.arange(slots).view(1, 1, slots) < others.unsqueeze(-1)  # [B, K, slots]
    keys = torch.rand(b, k * slots, generator=generator).masked_fill(~is_draw.view(b, -1), 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)  # position of each draw in its row's random order
    drawn = (rank < n - 1) & is_draw.view(b, -1)
    subset = drawn.view(b, k, slots).any(dim=-1)
    subset[:, 0] = True
    return subset & cand_mask


def best_of_n_weights(adv: torch.Tensor, subset: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W[b, k*] = 1 where k* = argmax of A over the subset (ties: lowest index) and A[b, k*] > threshold.

    Returns (W [B, K], k* [B]).
    """
    best = first_argmax(adv.masked_fill(~subset, math.nan))
    best_adv = adv.gather(1, best.unsqueeze(1)).squeeze(1)
    weights = torch.zeros_like(adv)
    weights[torch.arange(len(best)), best] = (best_adv > threshold).to(adv.dtype)
    return weights, best


def awr_weights(adv0: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """w = min(exp(A(s, a_data) / β), w_max) for each state [B]."""
    return torch.exp(adv0 / beta).clamp(max=max_weight)


def reinforce_weights(adv: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """W[b, k] = A(s_b, a_k) on the sampled subset, 0 elsewhere (negative advantages push log π down)."""
    return torch.where(subset, adv, torch.zeros_like(adv))


def method_weights(config: BaseModel, data: Transitions, adv: torch.Tensor | None, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The imitation weights W [B, K] of ``config.method`` (an :func:`actor_record`) and its selection metrics."""
    data.require("cand_sa", "cand_mask")
    b, k = data.cand_mask.shape
    first = torch.zeros(b, k)
    if config.method in ("digiq", "awr", "reinforce") and adv is None:
        raise DigiqError(f"method {config.method!r} needs the critic's advantages", field="method")
    if config.method == "bc":
        first[:, 0] = 1.0
        weights, imitated = first, torch.zeros(b, dtype=torch.long)
    elif config.method == "filtered-bc":
        data.require("traj_success")
        first[:, 0] = data.traj_success.float().cpu()
        weights, imitated = first, torch.zeros(b, dtype=torch.long)
    elif config.method == "digiq":
        weights, imitated = best_of_n_weights(adv, sample_n_subset(data.cand_mask.cpu(), data.cand_count.cpu(), config.n, generator), config.threshold)
    elif config.method == "awr":
        first[:, 0] = awr_weights(adv[:, 0], config.awr_beta, config.awr_max_weight)
        weights, imitated = first, torch.zeros(b, dtype=torch.long)
    else:  # reinforce
        weights = reinforce_weights(adv, sample_n_subset(data.cand_mask.cpu(), data.cand_count.cpu(), config.n, generator))
        imitated = first_argmax(weights.masked_fill(weights == 0, math.nan))
    return weights, _selection_metrics(config.method, weights, imitated, adv)


def _selection_metrics(method: str, weights: torch.Tensor, imitated: torch.Tensor, adv: torch.Tensor | None) -> dict[str, float]:
    kept = (weights != 0).any(dim=1)
    out = {"n_states": int(len(kept)), "n_kept": int(kept.sum()), "frac_states_kept": kept.float().mean().item()}
    if method != "reinforce":
        out["frac_imitated_not_dataset"] = (imitated[kept] != 0).float().mean().item() if kept.any() else math.nan
    if adv is not None:
        if method == "reinforce":  # every sampled (state, candidate) pair carries its advantage
            sampled = weights[weights != 0]
            out["mean_advantage_kept"] = sampled.mean().item() if len(sampled) else math.nan
            out["frac_negative_weights"] = (sampled < 0).float().mean().item() if len(sampled) else math.nan
        else:  # the advantage of the imitated action, weighted by its weight (AWR: Σ w A / Σ w)
            w = weights.gather(1, imitated.unsqueeze(1)).squeeze(1)
            a = adv.gather(1, imitated.unsqueeze(1)).squeeze(1)
            out["mean_advantage_kept"] = ((w * a).sum() / w.sum()).item() if w.sum() > 0 else math.nan
    return out


# ----------------------------------------------------------------------------------------------- training


def train_actor(
    data: Transitions,
    params: ActorParams | None = None,
    critic: DoubleCritic | None = None,
    log_fn: LogFn | None = None,
    *,
    method: str = "digiq",
    seed: int | None = None,
    show_progress: bool = False,
) -> tuple[CandidatePolicy, dict[str, float], list[dict[str, float]]]:
    """Extract a policy with ``method`` (seed ``seed``; None: the declared one); returns (policy, metrics, history).

    ``critic`` is required for digiq / awr / reinforce; given for bc / filtered-bc it only adds the mean
    advantage of the imitated actions to the metrics. Metrics: n_states, n_kept, frac_states_kept,
    mean_advantage_kept, train_loss (last window), agreement (policy argmax = imitated candidate, kept states).
    """
    config = actor_record(params, method, seed)
    data.require("cand_sa", "cand_mask")
    device = resolve_device(config.device)
    generator = seeded_generator(config.seed)
    adv = advantage(critic, data.s, data.cand_sa) if critic is not None else None
    weights, metrics = method_weights(config, data, adv, generator)
    kept = (weights != 0).any(dim=1)
    if not bool(kept.any()):
        raise DigiqError(f"method {config.method!r} kept no state (threshold {config.threshold}?)", file=data.source, field="method")
    rows = kept.nonzero().squeeze(1)
    table = [t[rows].to(device, dtype).contiguous() for t, dtype in
             ((data.s, torch.float32), (data.cand_sa, torch.float32), (data.cand_mask, torch.bool),
              (data.cand_count, torch.float32), (weights, torch.float32))]
    policy = CandidatePolicy(data.s.shape[1], data.sa.shape[1], params, method=method, seed=config.seed).to(device)
    policy.fit_standardization(*table[:3])
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, fused=True)
    sampler = EpochSampler(len(rows), config.batch_size, generator, device)
    window, history = RunningMeans(), []
    with progress_bar(f"actor ({config.method})", config.updates, enabled=show_progress) as bar:
        for step in range(1, config.updates + 1):
            idx = sampler.next()
            s, cand_sa, mask, count, w = (t.index_select(0, idx) for t in table)
            loss = imitation_loss(policy.log_probs(s, cand_sa, mask, count), w)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip, foreach=True)
            optimizer.step()
            window.add({"loss": loss, "grad_norm": grad_norm})
            bar.advance()
            if step % config.log_every == 0 or step == config.updates:
                point = {"step": step, "epoch": step * config.batch_size / len(rows), **window.pop()}
                history.append(point)
                if log_fn is not None:
                    log_fn(point, step)
    policy.eval()
    metrics["train_loss"] = history[-1]["loss"]
    metrics["agreement"] = _agreement(policy, table)
    return policy, metrics, history


@torch.no_grad()
def _agreement(policy: CandidatePolicy, table: list[torch.Tensor]) -> float:
    """Fraction of states with a positive weight where π's argmax is the highest-weighted candidate."""
    s, cand_sa, mask, count, weights = table
    rows = weights.max(dim=1).values > 0
    if not bool(rows.any()):
        return math.nan
    chosen = map_chunks(policy.act, s[rows], cand_sa[rows], mask[rows], count[rows], device=weights.device)
    return (chosen == first_argmax(weights[rows].cpu())).float().mean().item()


# ----------------------------------------------------------------------------------------------- the stage's pieces


def load_critic(directory: str | Path, *, required: bool) -> DoubleCritic | None:
    """The trained critic at ``directory``; None when absent and not required (DigiqError when required)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        if required:
            raise DigiqError("no trained critic here (run `digiq critic` first)", file=directory / "config.json")
        return None
    return DoubleCritic.from_pretrained(directory)


def check_dims(critic: DoubleCritic, data: TrainingData, critic_dir: str | Path) -> None:
    """The critic reads features of the sizes the store serves (DigiqError naming its config otherwise)."""
    d_s, d_sa = data.frame.state.shape[1], data.frame.action.shape[1]
    if (critic.d_s, critic.d_sa) != (d_s, d_sa):
        raise DigiqError(f"critic expects d_s={critic.d_s}, d_sa={critic.d_sa} but the store serves {d_s}, {d_sa} "
                         "(trained on another variant? re-run `digiq critic`)", file=Path(critic_dir) / "config.json", field="dims")


def policy_scores(policy: CandidatePolicy, data: TrainingData) -> pa.Table:
    """traj_id, step_id, cand_idx, action, draws, prob and chosen over every distinct candidate."""
    import pyarrow as pa

    transitions = data.transitions()
    logits = map_chunks(policy.logits, transitions.s, transitions.cand_sa, transitions.cand_mask, transitions.cand_count,
                        device=next(policy.parameters()).device)
    prob = torch.softmax(logits, dim=-1).double().numpy()
    chosen = np.zeros(prob.shape, dtype=bool)
    chosen[np.arange(len(prob)), first_argmax(logits).numpy()] = True
    row, idx = np.nonzero(data.distinct)
    return pa.table({
        "traj_id": pa.array(data.traj_id[row].tolist(), pa.string()), "step_id": pa.array(data.step_id[row], pa.int64()),
        "cand_idx": pa.array(idx, pa.int64()), "action": pa.array(data.frame.candidate_actions[row, idx].tolist(), pa.string()),
        "draws": data.draws[row, idx].astype(np.int64), "prob": prob[row, idx], "chosen": chosen[row, idx],
    })
