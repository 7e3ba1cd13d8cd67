"""What the critic and actor stages train on: the feature store's training frame plus the per-row facts both need.

    data = read_training_data(params.features, channels=params.channels.out)  # every dataset step, from the offline store's sources
    transitions = data.transitions(rows, inputs=params.critic.inputs)         # the library's Transitions (torch)

With ``inputs`` (:class:`digiq.channels.Inputs`) the states and state-actions are the heads' composed inputs: s, s_next
are x_V(s), x_V(s') and sa, cand_sa are x_Q(s, a) (:func:`digiq.channels.compose`; x_V(s') = 0 where no s' is
stored, x_Q = 0 at masked candidates); without, today's f(s), f(s, a).

Candidates are de-duplicated as the candidates stage recorded (:func:`digiq.feature_contract.semantic_key`, served as
each candidate's draw count): ``distinct`` keeps the first candidate of each class, ``draws`` says how many of π_β's
draws it stands for. A trajectory succeeded when some step of it has reward > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from digiq import feature_contract as fc
from digiq.errors import DigiqError

if TYPE_CHECKING:
    import torch

    from digiq.channels import Inputs
    from digiq.config import FeaturesParams
    from digiq.transitions import Transitions
    from digiq.store_client import TrainingFrame


@dataclass
class TrainingData:
    """The feature-store frame plus the per-row facts both critic and actor stages need."""

    frame: TrainingFrame
    traj_id: np.ndarray    # [N] str
    step_id: np.ndarray    # [N] int64
    success: np.ndarray    # [N] bool: the row's trajectory has a step with reward > 0
    truncated: np.ndarray  # [N] bool: no s' and not done (cut-off last step)
    distinct: np.ndarray   # [N, K] bool: valid candidates whose semantic key is not a repeat
    draws: np.ndarray      # [N, K] float32: at a distinct candidate, the valid candidates sharing its key (else 0)
    source: str

    def __len__(self) -> int:
        return len(self.traj_id)

    def transitions(self, rows: np.ndarray | None = None, inputs: Inputs | None = None) -> Transitions:
        """The rows (all when None) as the library's Transitions (zero-copy views where possible); with ``inputs`` the
        states and state-actions are the composed head inputs x_V, x_Q of those rows."""
        import torch

        from digiq.transitions import Transitions

        f = self.frame

        def tensor(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            picked = a if rows is None else a[rows]
            return torch.from_numpy(np.require(picked, requirements=["C", "W"])).to(dtype)  # Arrow-backed arrays are read-only

        if inputs is None:
            s, sa, s_next, cand_sa = tensor(f.state), tensor(f.action), tensor(f.next_state), tensor(f.candidates)
        else:
            x_v, x_q, x_v_next = self.composed(inputs, rows)
            s, s_next, cand_sa = torch.from_numpy(x_v), torch.from_numpy(x_v_next), torch.from_numpy(x_q)
            sa = cand_sa[:, 0]  # candidate 0 is the dataset action
        return Transitions(
            s=s, sa=sa, s_next=s_next, reward=tensor(f.reward),
            done=tensor(f.done), mc_return=tensor(f.mc_return), cand_sa=cand_sa,
            cand_mask=tensor(self.distinct, torch.bool), cand_count=tensor(self.draws),
            traj_success=tensor(self.success, torch.bool), source=self.source,
        )


    def composed(self, inputs: Inputs, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x_V(s) [n, d_v_in], x_Q(s, a_k) [n, K, d_q_in], x_V(s') [n, d_v_in]) of the rows (all when None)."""
        from digiq.channels import compose, compose_v

        f = self.frame
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])
        state = {name: pick(a) for name, a in f.channels.items() if name != "action"}
        action = pick(f.channels["action"]) if "action" in f.channels else None
        x_v, x_q = compose(inputs, f_s=pick(f.state), f_sa=pick(f.candidates), state=state, action=action)
        x_q[~pick(f.candidate_mask)] = 0.0  # masked candidates stay zeros
        x_v_next = compose_v(inputs, pick(f.next_state), {name: pick(a) for name, a in f.next_channels.items()})
        return x_v, x_q, x_v_next  # x_V(s') = 0 where no s' is stored (zero inputs)


def read_training_data(features: FeaturesParams, channels: str | Path | None = None) -> TrainingData:
    """Every dataset step of ``features.variant``, read through the offline store from the sources the features stage
    wrote (DigiqError naming the missing one); with ``channels`` (the `digiq channels` folder) the channel views too."""
    from digiq.store_client import offline_store, training_frame

    paths = fc.source_paths(features.embeddings, features.derived, features.variant, channels)
    with offline_store(features.repo, paths) as store:
        frame = training_frame(store)
    source = f"feature store sources {Path(paths['transitions']).parent} (variant {features.variant})"
    if len(frame) == 0:
        raise DigiqError(f"the feature store serves no transitions (run `digiq features materialize --variant {features.variant}`)",
                         file=paths["transitions"], field="transition")
    traj_id, step_id = fc.split_state_keys(frame.state_key)
    return TrainingData(
        frame=frame, traj_id=traj_id, step_id=step_id, success=trajectory_success(traj_id, frame.reward),
        truncated=~frame.has_next & ~frame.done, distinct=frame.candidate_draws > 0,
        draws=frame.candidate_draws.astype(np.float32), source=source,
    )


def trajectory_success(traj_id: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """Per row: whether any row of the same trajectory has reward > 0."""
    codes, inverse = np.unique(traj_id, return_inverse=True)
    success = np.zeros(len(codes), dtype=bool)
    np.logical_or.at(success, inverse, reward > 0)
    return success[inverse]


def split_trajectories(traj_id: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """[N] bool, True for rows of held-out trajectories: round(fraction · n_traj) of them (≥ 1 when fraction > 0 and
    there are ≥ 2 trajectories; never all), chosen by a seeded permutation of the sorted ids."""
    if not 0.0 <= fraction < 1.0:
        raise DigiqError(f"must be in [0, 1), got {fraction}", field="critic.val_fraction")
    unique = np.unique(traj_id)
    n_val = min(max(round(fraction * len(unique)), 1 if fraction > 0 else 0), len(unique) - 1)
    held_out = unique[np.random.default_rng(seed).permutation(len(unique))[:n_val]]
    return np.isin(traj_id, held_out)
