"""Policy extraction on frozen features: Best-of-N (Digi-Q), the official AWR / PG variants and the paper's baselines.

The policy scores a state's candidate actions and acts through a softmax over the valid ones:

    g(s, a_k) = MLP([x_V(s), x_Q(s, a_k)])      (or MLP(x_Q(s, a_k)) without the state)
    π(k | s)  = n_k · exp g(s, a_k) / Σ_j n_j · exp g(s, a_j)     over k with cand_mask[s, k]

x_V and x_Q are the channels ``actor.inputs`` names (digiq/channels.py; VLM only: f(s), f(s, a)). n_k (``cand_count``)
is how many of π_β's draws at s do what a_k does (same semantic key; candidates are de-duplicated by it). π_β's
preference is thus the prior π_β(k | s) = n_k / Σ_j n_j, and the scorer's last layer starts at zero: g ≡ 0, so the
untrained policy *is* π_β's empirical draw distribution, and the learned g only says where to depart from it. With
``behavior_prior: false`` every n_k is 1 (a plain softmax over the distinct candidates, uniform at the start).

Every method is weighted imitation with weights W [B, K] (digiq/extraction_weights.py: which methods, the fresh
Best-of-N subset per update, the official clamped variants). Batches are drawn from every training state; a state
with no weight contributes only to the anchor:

    L = −(1/|batch|) Σ_b Σ_k W[b, k] · log π(k | s_b)  +  anchor · mean_{b, k valid} g(s_b, a_k)²

(the mean over the batch, kept or not, as the official ``actor_loss``). The anchor pulls g towards 0, i.e. π towards
π_β, wherever nothing is imitated: the official actor starts as π_β and moves only where it imitates kept actions.
REINFORCE's loss is unbounded below when negative weights dominate (log π of a bad candidate → −∞): the instability
the paper attributes to negative gradients; it is kept as specified, not clamped.

Measured, not trained: KL(π ‖ π_β) = Σ_k π(k | s) log(π(k | s) / π_β(k | s)) averaged over the training states never
kept, the kept ones and, when ``held_out`` rows are given (held-out trajectories, never trained on), those states; and
on the held-out states the cross-entropy of π against the extraction's target, −Σ_k T[b, k] log π(k | s_b) with
T the mean over fresh draws (8 subsets) of W's row normalised where the draw keeps the state, π_β where it does not:
how well the policy predicts, on states it never saw, what the method asks for (move where the critic keeps, stay at
π_β elsewhere). ``anchor`` is chosen by the lowest held-out target cross-entropy (docs/results.md).
"""

from __future__ import annotations

import dataclasses

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from digiq.channels import Inputs
from digiq.config import ActorParams, Method
from digiq.critic import DoubleCritic, LogFn, Transitions, advantage, first_argmax, record_model
from digiq.errors import DigiqError
from digiq.extraction_weights import NEEDS_ADVANTAGE, BatchWeights, SelectionTally
from digiq.nn import (EpochSampler, RunningMeans, Standardize, load_pretrained, load_state, map_chunks, mlp,
                      resolve_device, save_pretrained, seeded_generator)
from digiq.progress import progress_bar

if TYPE_CHECKING:
    import pyarrow as pa

    from digiq.training_data import TrainingData

KIND = "digiq.policy"
METHODS: tuple[str, ...] = get_args(Method)
NEEDS_CRITIC = NEEDS_ADVANTAGE
SAVED = ("inputs", "n", "threshold", "awr_beta", "awr_max_weight", "pg_multiplier", "anchor", "use_state", "behavior_prior",
         "hidden", "standardize", "lr", "grad_clip", "batch_size", "updates", "log_every", "device")
VLM_ONLY = {"q": ["vlm"], "v": ["vlm"]}
ABSENT_MEANS = {"inputs": VLM_ONLY}  # policies saved before channels read f(s), f(s, a) alone
ActorRecord = record_model("ActorRecord", ActorParams, SAVED, top_level=("seed",),
                           method=(Method, Field("digiq", description="the extraction method (actor.methods)")))
HELD_OUT_DRAWS = 8  # fresh subsets averaged into the held-out target of the per-update methods
SELECTION = ("frac_states_kept", "frac_imitated_not_dataset", "mean_advantage_kept", "frac_negative_weights")


def actor_record(params: ActorParams | None = None, method: str = "digiq", seed: int | None = None) -> BaseModel:
    """What a policy extracted by ``method`` with ``params`` (defaults: the declared ones) and ``seed`` records."""
    if method not in METHODS:
        raise DigiqError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})", field="method")
    return ActorRecord(**(params or ActorParams()).model_dump(include=set(SAVED)), method=method,
                       **({} if seed is None else {"seed": seed}))


# ----------------------------------------------------------------------------------------------- the policy


class CandidatePolicy(nn.Module):
    """An MLP scorer over [x_V(s), x_Q(s, a_k)] (or x_Q(s, a_k)) → logits over a state's candidate set; its last
    layer starts at zero (g ≡ 0: π = π_β's draw distribution)."""

    def __init__(self, d_s: int, d_sa: int, params: ActorParams | None = None, *, method: str = "digiq",
                 seed: int | None = None):
        super().__init__()
        self.config = actor_record(params, method, seed)
        self.d_s, self.d_sa = d_s, d_sa
        self.scorer = mlp(d_sa + (d_s if self.config.use_state else 0), self.config.hidden)
        nn.init.zeros_(self.scorer[-1].weight)
        nn.init.zeros_(self.scorer[-1].bias)
        self.norm_s, self.norm_sa = ((Standardize(d_s), Standardize(d_sa)) if self.config.standardize
                                     else (nn.Identity(), nn.Identity()))

    @property
    def inputs(self) -> Inputs:
        """The channels of x_V and x_Q this policy reads (live evaluation composes the same)."""
        return self.config.inputs

    def fit_standardization(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor) -> None:
        """Fit the input layers (when ``standardize``): x_V over the states, x_Q over their valid candidates."""
        if isinstance(self.norm_s, Standardize):
            self.norm_s.fit(s)
            self.norm_sa.fit(cand_sa[cand_mask])

    def scores(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor | None = None) -> torch.Tensor:
        """g(s, a_k) [B, K], computed only where ``cand_mask`` (default: everywhere) is True; 0 elsewhere.

        The first layer W·[x_V(s); x_Q(s, a_k)] + b is computed as W_a·x_Q(s, a_k) + (W_s·x_V(s) + b): the state's
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

    def prior_logits(self, cand_mask: torch.Tensor, cand_count: torch.Tensor | None) -> torch.Tensor:
        """[B, K] log n_k (0 without the behavior prior); −inf at invalid candidates: π_β's unnormalised log-prior."""
        prior = torch.zeros(cand_mask.shape, device=cand_mask.device)
        if self.config.behavior_prior:
            if cand_count is None:
                raise DigiqError("this policy weighs candidates by π_β's draws (behavior_prior): pass how many draws each "
                                 "candidate stands for", field="cand_count")
            prior = cand_count.float().clamp(min=1.0).log()
        return prior.masked_fill(~cand_mask, -math.inf)

    def logits(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor, cand_count: torch.Tensor | None) -> torch.Tensor:
        """[B, K] logits g(s, a_k) + log n_k (n_k = 1 without the behavior prior); invalid candidates get −inf."""
        return self.scores(s, cand_sa, cand_mask) + self.prior_logits(cand_mask, cand_count)

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

    @torch.no_grad()
    def kl_to_prior(self, s: torch.Tensor, cand_sa: torch.Tensor, cand_mask: torch.Tensor, cand_count: torch.Tensor | None) -> torch.Tensor:
        """KL(π(· | s) ‖ π_β(· | s)) [B] over the valid candidates, π_β(k | s) = n_k / Σ_j n_j (the policy at g ≡ 0)."""
        log_pi = self.log_probs(s, cand_sa, cand_mask, cand_count)
        log_prior = F.log_softmax(self.prior_logits(cand_mask, cand_count), dim=-1).masked_fill(~cand_mask, 0.0)
        return (log_pi.exp() * (log_pi - log_prior)).masked_fill(~cand_mask, 0.0).sum(dim=-1)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(directory, self, kind=KIND, config=self.config, dims={"d_s": self.d_s, "d_sa": self.d_sa})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> CandidatePolicy:
        config, dims, state = load_pretrained(directory, kind=KIND, config_cls=ActorRecord, absent_means=ABSENT_MEANS)
        policy = cls(dims["d_s"], dims["d_sa"], ActorParams(**config.model_dump(include=set(SAVED))), method=config.method,
                     seed=config.seed)
        load_state(policy, state, directory)
        return policy.to(device).eval()


def imitation_loss(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = −mean_b Σ_k W[b, k] · log π(k | s_b)."""
    return -(weights * log_probs).sum(dim=-1).mean()


def anchor_penalty(scores: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """mean g(s_b, a_k)² over the valid candidates of every state in the batch (0 at g ≡ 0, i.e. at π = π_β)."""
    return scores[cand_mask].square().mean()


# ----------------------------------------------------------------------------------------------- training


def train_actor(
    data: Transitions,
    params: ActorParams | None = None,
    critic: DoubleCritic | None = None,
    log_fn: LogFn | None = None,
    *,
    method: str = "digiq",
    seed: int | None = None,
    advantages: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    held_out: torch.Tensor | None = None,
    show_progress: bool = False,
) -> tuple[CandidatePolicy, dict[str, float], list[dict[str, float]]]:
    """Extract a policy with ``method`` (seed ``seed``; None: the declared one); returns (policy, metrics, history).

    ``advantages`` [B, K]: A(s, a_k) of ``data``'s rows, computed once from the frozen critic on its own inputs (the
    policy may read other channels); without them, ``critic`` computes them on ``data``. Required for digiq, awr,
    awr-bon, pg-bon and reinforce; for bc / filtered-bc they only add the mean advantage of the imitated actions.
    ``weights`` [B, K]: precomputed W (method digirl). ``held_out`` [B] bool: rows of held-out trajectories, never
    trained on, where the KL to π_β and the target cross-entropy are measured. Metrics: n_states, n_kept (states kept
    in some update), frac_states_kept, frac_imitated_not_dataset, mean_advantage_kept (means over updates),
    train_loss and anchor_loss (last window), agreement (policy argmax = imitated candidate, kept states of a last
    draw), kl_prior_kept / kl_prior_never_kept (training states), kl_prior_heldout, heldout_target_ce.
    """
    config = actor_record(params, method, seed)
    data.require("cand_sa", "cand_mask")
    device = resolve_device(config.device)
    generator = seeded_generator(config.seed)
    if advantages is None and critic is not None:
        advantages = advantage(critic, data.s, data.cand_sa)
    count = data.cand_count if data.cand_count is not None else data.cand_mask.float()
    data, count, advantages, weights = packed_candidates(data, count, advantages, weights)
    train_rows = torch.arange(len(data.s)) if held_out is None else (~held_out.cpu().bool()).nonzero().squeeze(1)
    if len(train_rows) == 0:
        raise DigiqError("every row is held out: nothing to train on", file=data.source, field="held_out")

    def pick(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, rows)

    draws = BatchWeights(config, pick(data.cand_mask, train_rows), pick(count, train_rows), pick(data.traj_success, train_rows),
                         pick(advantages, train_rows), generator, pick(weights, train_rows))
    if not draws.per_update and not bool((draws.fixed != 0).any()):
        raise DigiqError(f"method {config.method!r} kept no state", file=data.source, field="method")
    adv_train = draws.adv
    table = [t.index_select(0, train_rows).to(device, dtype).contiguous() for t, dtype in
             ((data.s, torch.float32), (data.cand_sa, torch.float32), (data.cand_mask, torch.bool), (count, torch.float32))]
    policy = CandidatePolicy(data.s.shape[1], data.cand_sa.shape[2], params, method=method, seed=config.seed).to(device)
    policy.fit_standardization(*table[:3])
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, fused=True)
    sampler = EpochSampler(len(train_rows), config.batch_size, generator, "cpu")
    tally = SelectionTally(config.method, len(train_rows))
    if not draws.per_update:  # fixed weights: the selection metrics are exact over every training state
        tally.add(torch.arange(len(train_rows)), draws.all_rows(), adv_train)
    window, history = RunningMeans(), []
    with progress_bar(f"actor ({config.method})", config.updates, enabled=show_progress) as bar:
        for step in range(1, config.updates + 1):
            idx = sampler.next()
            draw = draws(idx)  # a fresh N-subset per update for the per-update methods
            if draws.per_update:
                tally.add(idx, draw, pick(adv_train, idx))
            s, cand_sa, mask, n_k = (t.index_select(0, idx.to(device)) for t in table)
            g = policy.scores(s, cand_sa, mask)
            log_pi = F.log_softmax(g + policy.prior_logits(mask, n_k), dim=-1).masked_fill(~mask, 0.0)
            imitation = imitation_loss(log_pi, draw.weights.to(device))
            anchor = anchor_penalty(g, mask)
            loss = imitation + config.anchor * anchor if config.anchor > 0 else imitation
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip, foreach=True)
            optimizer.step()
            window.add({"loss": loss, "imitation_loss": imitation, "anchor_loss": anchor, "grad_norm": grad_norm})
            bar.advance()
            if step % config.log_every == 0 or step == config.updates:
                point = {"step": step, "epoch": step * config.batch_size / len(train_rows), **window.pop()}
                history.append(point)
                if log_fn is not None:
                    log_fn(point, step)
    policy.eval()
    metrics = tally.metrics(SELECTION[:1] + SELECTION[2:] if config.method == "reinforce" else SELECTION[:3])
    if adv_train is None:
        metrics["mean_advantage_kept"] = math.nan
    metrics.update(train_loss=history[-1]["loss"], anchor_loss=history[-1]["anchor_loss"])
    last = draws.all_rows()
    metrics["agreement"] = _agreement(policy, table, last.weights)
    metrics.update(_kl_metrics(policy, table, tally.ever_kept))
    if held_out is not None and bool(held_out.any()):
        val_rows = held_out.cpu().bool().nonzero().squeeze(1)
        val_draws = BatchWeights(config, pick(data.cand_mask, val_rows), pick(count, val_rows), pick(data.traj_success, val_rows),
                                 pick(advantages, val_rows), generator, pick(weights, val_rows))
        val_weights = [val_draws.all_rows().weights for _ in range(HELD_OUT_DRAWS if val_draws.per_update else 1)]
        val_table = [t.index_select(0, val_rows) for t in (data.s, data.cand_sa, data.cand_mask, count)]
        metrics.update(_held_out_metrics(policy, val_table, val_weights))
    else:
        metrics.update(kl_prior_heldout=math.nan, heldout_target_ce=math.nan, heldout_ce_kept=math.nan,
                       heldout_ce_not_kept=math.nan, n_heldout=0, heldout_frac_kept=math.nan)
    return policy, metrics, history


def packed_candidates(data: Transitions, *per_candidate: torch.Tensor | None) -> tuple[Transitions, ...]:
    """``data`` and the [B, K] ``per_candidate`` tensors with each state's valid candidates moved to the front (order
    kept, so the dataset action stays column 0) and K cut to the most valid candidates of any state. A state has far
    fewer distinct candidates than K draws, and every update copies its batch's candidate rows: packing them is what
    keeps wide channel inputs affordable. Nothing else changes: invalid slots are never scored."""
    mask = data.cand_mask
    width = int(mask.sum(dim=1).max())
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]

    def gather(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        index = order.view(*order.shape, *([1] * (t.ndim - 2))).expand(*order.shape, *t.shape[2:])
        return t.gather(1, index.to(t.device))

    packed = dataclasses.replace(data, cand_sa=gather(data.cand_sa), cand_mask=gather(mask), cand_count=gather(data.cand_count))
    return (packed, *(gather(t) for t in per_candidate))


@torch.no_grad()
def _agreement(policy: CandidatePolicy, table: list[torch.Tensor], weights: torch.Tensor) -> float:
    """Fraction of states with a positive weight where π's argmax is the highest-weighted candidate."""
    s, cand_sa, mask, count = table
    rows = weights.max(dim=1).values > 0
    if not bool(rows.any()):
        return math.nan
    on = rows.to(s.device)
    chosen = map_chunks(policy.act, s[on], cand_sa[on], mask[on], count[on], device=s.device)
    return (chosen == first_argmax(weights[rows])).float().mean().item()


def _kl(policy: CandidatePolicy, table: list[torch.Tensor]) -> torch.Tensor:
    return map_chunks(policy.kl_to_prior, *table, device=next(policy.parameters()).device)


def _mean(values: torch.Tensor) -> float:
    return values.mean().item() if len(values) else math.nan


def _kl_metrics(policy: CandidatePolicy, table: list[torch.Tensor], ever_kept: torch.Tensor) -> dict[str, float]:
    """Mean KL(π ‖ π_β) over the training states kept in some update and over those never kept."""
    kl = _kl(policy, table)
    return {"kl_prior_kept": _mean(kl[ever_kept]), "kl_prior_never_kept": _mean(kl[~ever_kept])}


@torch.no_grad()
def _held_out_metrics(policy: CandidatePolicy, table: list[torch.Tensor], draws: list[torch.Tensor]) -> dict[str, float]:
    """On held-out states: mean KL(π ‖ π_β), and the cross-entropy −Σ_k T_k log π_k against the target T, the mean
    over ``draws`` (fresh subsets) of W's row normalised where the draw keeps the state and π_β where it does not
    (negative weights count as none); also split by whether some draw kept the state (ce_kept / ce_not_kept)."""
    s, cand_sa, mask, count = table
    device = next(policy.parameters()).device
    log_pi = map_chunks(policy.log_probs, s, cand_sa, mask, count, device=device)
    prior = F.softmax(policy.prior_logits(mask, count), dim=-1)
    target, kept = torch.zeros_like(prior), torch.zeros(len(s), dtype=torch.bool)
    for weights in draws:
        positive = weights.clamp(min=0.0) * mask
        total = positive.sum(dim=1, keepdim=True)
        target += torch.where(total > 0, positive / total.clamp(min=1e-12), prior) / len(draws)
        kept |= total.squeeze(1) > 0
    ce = -(target * log_pi).sum(dim=1)
    return {"kl_prior_heldout": _mean(_kl(policy, table)), "heldout_target_ce": _mean(ce),
            "heldout_ce_kept": _mean(ce[kept]), "heldout_ce_not_kept": _mean(ce[~kept]),
            "n_heldout": len(s), "heldout_frac_kept": _mean(kept.float())}


# ----------------------------------------------------------------------------------------------- the stage's pieces


def load_critic(directory: str | Path, *, required: bool) -> DoubleCritic | None:
    """The trained critic at ``directory``; None when absent and not required (DigiqError when required)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        if required:
            raise DigiqError("no trained critic here (run `digiq critic` first)", file=directory / "config.json")
        return None
    return DoubleCritic.from_pretrained(directory)


def check_dims(critic: DoubleCritic, transitions: Transitions, critic_dir: str | Path) -> None:
    """The critic reads inputs of the widths its channels have in the store (DigiqError naming its config otherwise)."""
    d_s, d_sa = transitions.s.shape[1], transitions.sa.shape[1]
    if (critic.d_s, critic.d_sa) != (d_s, d_sa):
        raise DigiqError(f"critic expects d_s={critic.d_s}, d_sa={critic.d_sa} but the store serves {d_s}, {d_sa} "
                         "(trained on another variant? re-run `digiq critic`)", file=Path(critic_dir) / "config.json", field="dims")


def policy_scores(policy: CandidatePolicy, data: TrainingData, transitions: Transitions) -> pa.Table:
    """traj_id, step_id, cand_idx, action, draws, prob and chosen over every distinct candidate (``transitions``: the
    policy's inputs of ``data``'s rows)."""
    import pyarrow as pa

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
