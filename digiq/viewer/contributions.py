"""The critic's input channels' contributions, per step: how much V(s) and Q(s, a) change when one channel is set to its
training mean (:mod:`digiq.channel_attribution`, written by the critic stage):

    ΔV_c(s) = V(x_V) − V(x_V with x_c := μ_c),    ΔQ_c(s, a) = Q(x_Q) − Q(x_Q with x_c := μ_c)

Critic output folder, optional ``DIR/channel_scores.parquet`` — one row per candidate, key (traj_id, step_id, cand_idx):
    traj_id, step_id, cand_idx   as in candidate_scores.parquet (0 = the dataset action)
    v, q       float   V(s) and Q(s, a)
    dv_<c>     float   ΔV_c(s) for each channel c of V (the same on every candidate row of a step)
    dq_<c>     float   ΔQ_c(s, a) for each channel c of Q
A head fed by one channel has no Δ columns (nothing to attribute): a VLM-only critic (q: [vlm], v: [vlm] in its
config.json; folders saved before ``inputs`` existed are VLM-only) has none, and the page says so instead.
The page shows V(s), the dataset action and the candidates the critic table shows, one signed bar per channel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from digiq.channels import ORDER
from digiq.errors import DigiqError
from digiq.viewer.tables import KEY_COLUMNS, Key, TableSpec, read_side_table

FILE = "channel_scores.parquet"
VLM_ONLY = "none: a VLM-only critic (Q reads f(s, a), V reads f(s)): one input channel per head, nothing to attribute"
ONE_CHANNEL = "none: each of the critic's heads reads one input channel, nothing to attribute"
NOT_WRITTEN = f"not in the critic folder (no {FILE}: re-run the critic stage)"
CHANNEL_NAMES = {"prev_action": "prev action"}
VLM_INPUTS = {"q": ["vlm"], "v": ["vlm"]}  # what a config.json without ``inputs`` was trained with (digiq.critic.ABSENT_MEANS)


@dataclass(frozen=True)
class StepContributions:
    v: float  # V(s)
    dv: dict[str, float]  # channel -> ΔV_c(s)
    q: dict[int, tuple[float, dict[str, float]]]  # cand_idx -> (Q(s, a), {channel: ΔQ_c(s, a)})


@dataclass(frozen=True)
class Contributions:
    steps: dict[Key, StepContributions] | None  # None: nothing to show (see note)
    channels: tuple[str, ...] = ()  # every attributed channel, in canonical order (digiq.channels.ORDER)
    note: str | None = None  # shown in the page's facts when there is nothing per step
    source: Path | None = None


def load_contributions(folder: str | Path) -> Contributions:
    """The critic folder's channel contributions, or why there are none (a VLM-only critic, an older stage)."""
    import pyarrow.parquet as pq

    path = Path(folder) / FILE
    if not path.is_file():  # a folder without config.json is not the critic stage's: nothing to say
        inputs = _inputs(Path(folder))
        return Contributions(None, note=None if inputs is None else VLM_ONLY if inputs == VLM_INPUTS else NOT_WRITTEN)
    names = [n for n in pq.read_schema(path).names if n.startswith(("dv_", "dq_"))]
    if not names:
        return Contributions(None, note=VLM_ONLY if _inputs(Path(folder)) == VLM_INPUTS else ONE_CHANNEL, source=path)
    spec = TableSpec(KEY_COLUMNS + (("cand_idx", "int"), ("v", "float"), ("q", "float"), *((n, "float") for n in names)),
                     ("traj_id", "step_id", "cand_idx"))
    table = read_side_table(path, spec).to_pydict()
    dv, dq = [n for n in names if n.startswith("dv_")], [n for n in names if n.startswith("dq_")]
    steps: dict[Key, StepContributions] = {}
    for i, key in enumerate(zip(table["traj_id"], table["step_id"])):
        step = steps.setdefault(key, StepContributions(table["v"][i], {n[3:]: table[n][i] for n in dv}, {}))
        step.q[table["cand_idx"][i]] = (table["q"][i], {n[3:]: table[n][i] for n in dq})
    channels = tuple(sorted({n[3:] for n in names}, key=lambda c: (ORDER.index(c) if c in ORDER else len(ORDER), c)))
    return Contributions(steps, channels, source=path)


def _inputs(folder: Path) -> dict[str, list[str]] | None:
    """The critic's channels from its config.json ({q, v}; saved before ``inputs`` existed: VLM-only), None without one."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        inputs = json.loads(path.read_text()).get("config", {}).get("inputs") or VLM_INPUTS
        return {"q": list(inputs["q"]), "v": list(inputs["v"])}
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DigiqError(f"not a readable critic config ({exc!r})", file=path, field="inputs") from None


# ------------------------------------------------------------------------------------------------ HTML


def contributions_table(step: StepContributions, channels: tuple[str, ...], shown: list[tuple[int, str, str]]) -> str:
    """V(s), then each shown candidate (cand_idx, row label, marker id) that has a row: its score and one signed bar per
    channel, scaled to the step's largest |Δ|; "·" where the channel is not an input of that head."""
    from digiq.viewer.render import esc, num

    rows = [("v", "V(s)", "", step.v, step.dv, "not an input of V")]
    rows += [(f"c{idx}", label, mark, *step.q[idx], "not an input of Q") for idx, label, mark in shown if idx in step.q]
    scale = max([abs(d) for *_, deltas, _ in rows for d in deltas.values()] + [1e-12])

    def cell(channel: str, deltas: dict[str, float], missing: str) -> str:
        if channel not in deltas:
            return f'<td class="muted" data-channel="{esc(channel)}" title="{esc(missing)}">·</td>'
        d = deltas[channel]
        width = round(100 * abs(d) / scale)
        return f'<td class="dc {"neg" if d < 0 else "pos"}" data-channel="{esc(channel)}" style="--w:{width}%">{"+" if d >= 0 else ""}{num(d)}</td>'

    body = "".join(
        f'<tr data-row="{row}"' + (f' data-mark="{esc(mark)}"' if mark else "") + f"><th>{esc(label)}</th><td>{num(score)}</td>"
        + "".join(cell(c, deltas, missing) for c in channels) + "</tr>"
        for row, label, mark, score, deltas, missing in rows
    )
    head = "".join(f"<th>{esc(CHANNEL_NAMES.get(c, c))}</th>" for c in channels)
    return (
        '<table class="cands contrib" data-field="contributions"><caption>Channel contributions · '
        '<span class="muted">Δ = score − score with that channel at its training mean</span></caption>'
        f"<tr><th></th><th>score</th>{head}</tr>{body}</table>"
    )
