"""How much each input channel moves the critic's scores: one channel at a time set to its training mean.

A head's input is the concatenation of the channels ``critic.inputs`` selects, in canonical order
(:mod:`digiq.channels`): x = x_1 ⊕ … ⊕ x_C, with μ = μ_1 ⊕ … ⊕ μ_C its training mean. Per channel c,

    ΔQ_c(s, a) = Q(x_Q(s, a)) − Q(x_Q(s, a) with x_c := μ_c)        Q = max(Q1, Q2)
    ΔV_c(s)    = V(x_V(s))    − V(x_V(s) with x_c := μ_c)            V = max(V1, V2)

(Q and V as the advantage A = Q − V reads them). μ is the mean the heads' Standardize layers hold when
``standardize`` is on (x_Q of the training rows' dataset actions, x_V of their states): the channel at its mean is
then z_c = 0, "an average screen / goal / action". Without standardization μ is the mean over the rows the caller
names (the stage: its training rows). For a linear head Q = w · z(x) + b, ΔQ_c = w_c · (x_c − μ_c) / σ_c exactly.
For an MLP the ΔQ_c are one-at-a-time ablations, not a decomposition: they need not sum to Q(x) − Q(μ) (channels
interact), and a channel the head ignores gets 0. A head fed by a single channel (the VLM-only critic: q [vlm],
v [vlm]) has nothing to attribute: it gets no Δ.

    slices = head_slices(inputs.q, {"vlm": d_sa, **channel_dims(d_v, d_e)})
    deltas = channel_deltas(critic.q_value, x_q, slices, head_mean(critic.online.q1))   # {channel: ΔQ_c}
    table = attribution_table(critic, data, rows, mean_rows=train_rows)   # what the critic stage writes
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from digiq.errors import DigiqError
from digiq.nn import Standardize, map_chunks

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from digiq.channels import Inputs
    from digiq.critic import DoubleCritic
    from digiq.training_data import TrainingData

FILE = "channel_scores.parquet"  # in the critic's folder, beside step_scores.parquet (read by the viewer)
CHUNK = 512  # rows composed at a time (x_Q of every candidate holds K copies of the state channels)


def head_slices(names: Sequence[str], widths: Mapping[str, int], total: int | None = None) -> dict[str, slice]:
    """Each channel's columns in a head input made of ``names`` (canonical order) of the given widths; with
    ``total`` (the head's input width) a mismatch is an error."""
    slices, start = {}, 0
    for name in names:
        if name not in widths:
            raise DigiqError(f"no width known for channel {name!r} (known: {sorted(widths)})", field="critic.inputs")
        slices[name], start = slice(start, start + widths[name]), start + widths[name]
    if total is not None and start != total:
        raise DigiqError(f"channels {list(names)} are {start} wide, the critic's head input {total}", field="critic.inputs")
    return slices


def head_mean(head: nn.Module, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """μ of a head's input: its Standardize layer's mean when it has one, else ``fallback`` (a mean the caller
    computed over the training rows)."""
    first = head[0] if isinstance(head, nn.Sequential) else None
    if isinstance(first, Standardize):
        return first.mean.detach().float().cpu()
    if fallback is None:
        raise DigiqError("the critic has no standardization layer: give the training mean of its inputs", field="critic.standardize")
    return fallback.float().cpu()


@torch.no_grad()
def channel_deltas(value: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, slices: Mapping[str, slice],
                   mean: torch.Tensor, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """{c: value(x) − value(x with x[..., c] := mean[c])} for inputs x [..., d] (empty when one channel feeds the head)."""
    if len(slices) < 2:
        return {}
    full = map_chunks(value, x, device=device)
    deltas = {}
    for name, columns in slices.items():
        ablated = x.clone()
        ablated[..., columns] = mean[columns].to(ablated.dtype)
        deltas[name] = full - map_chunks(value, ablated, device=device)
    return deltas


def frame_widths(data: TrainingData) -> tuple[dict[str, int], dict[str, int]]:
    """(V widths, Q widths) of every channel the training frame serves: vlm is f(s) in V, f(s, a) in Q."""
    f = data.frame
    others = {name: int(array.shape[-1]) for name, array in f.channels.items()}
    return {**others, "vlm": int(f.state.shape[-1])}, {**others, "vlm": int(f.candidates.shape[-1])}


def row_means(data: TrainingData, rows: np.ndarray, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean x_V(s), mean x_Q(s, a_data)) over ``rows``: the concatenation of each channel's mean (what a Standardize
    fitted on those rows would hold)."""
    from digiq.channels import compose

    f = data.frame
    state = {name: a[rows].mean(0, keepdims=True) for name, a in f.channels.items() if name != "action"}
    action = f.channels["action"][rows, :1].mean(0, keepdims=True) if "action" in f.channels else None
    x_v, x_q = compose(inputs, f_s=f.state[rows].mean(0, keepdims=True), f_sa=f.candidates[rows, :1].mean(0, keepdims=True),
                       state=state, action=action)
    return torch.from_numpy(x_v[0]), torch.from_numpy(x_q[0, 0])


def attribution_table(critic: DoubleCritic, data: TrainingData, rows: np.ndarray, mean_rows: np.ndarray | None = None) -> pa.Table:
    """One row per valid candidate of ``rows``: traj_id, step_id, cand_idx, v = V(s), q = Q(s, a), then dv_<c> = ΔV_c(s)
    per channel of V and dq_<c> = ΔQ_c(s, a) per channel of Q (none for a head fed by one channel). μ: the heads'
    standardization means, else the means over ``mean_rows`` (default ``rows``)."""
    import numpy as np
    import pyarrow as pa

    from digiq.critic import device_of

    inputs, device = critic.config.inputs, device_of(critic)
    widths_v, widths_q = frame_widths(data)
    slices_v, slices_q = head_slices(inputs.v, widths_v, critic.d_s), head_slices(inputs.q, widths_q, critic.d_sa)
    fallback_v = fallback_q = None
    if not all(isinstance(head[0], Standardize) for head in (critic.online.v1, critic.online.q1)):
        fallback_v, fallback_q = row_means(data, rows if mean_rows is None else mean_rows, inputs)
    mean_v, mean_q = head_mean(critic.online.v1, fallback_v), head_mean(critic.online.q1, fallback_q)
    names = ["v", "q", *(f"dv_{c}" for c in slices_v if len(slices_v) > 1), *(f"dq_{c}" for c in slices_q if len(slices_q) > 1)]
    keys: list[tuple[np.ndarray, ...]] = []
    values: list[list[torch.Tensor]] = []
    for chunk in np.array_split(rows, -(-len(rows) // CHUNK)) if len(rows) else []:
        x_v, x_q, _ = data.composed(inputs, chunk)
        valid = np.asarray(data.frame.candidate_mask[chunk], dtype=bool)
        row, cand = np.nonzero(valid)
        x_v, x_q = torch.from_numpy(x_v), torch.from_numpy(x_q[valid])
        per_state = [map_chunks(critic.v_value, x_v, device=device), *channel_deltas(critic.v_value, x_v, slices_v, mean_v, device=device).values()]
        per_action = channel_deltas(critic.q_value, x_q, slices_q, mean_q, device=device).values()
        at = torch.from_numpy(row)
        values.append([per_state[0][at], map_chunks(critic.q_value, x_q, device=device), *(d[at] for d in per_state[1:]), *per_action])
        keys.append((data.traj_id[chunk][row], data.step_id[chunk][row], cand))
    traj, step, cand = (np.concatenate(k) for k in zip(*keys)) if keys else (np.array([], str), np.array([], np.int64), np.array([], np.int64))
    columns = [torch.cat(c).double().numpy() for c in zip(*values)] if values else [np.array([], np.float64)] * len(names)
    return pa.table({"traj_id": pa.array(traj.tolist(), pa.string()), "step_id": pa.array(step, pa.int64()),
                     "cand_idx": pa.array(cand, pa.int64()), **dict(zip(names, columns))})
