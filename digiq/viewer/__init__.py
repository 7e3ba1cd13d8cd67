"""`digiq view`: a static, self-contained trajectory and critic viewer (no server stack, no CDN).

``build_site(dataset, out, labels=..., critic=..., policy=...)`` writes an HTML site that opens from
``file://`` (layout in ``digiq.viewer.site``); ``make_server(out, port)`` serves it on 127.0.0.1.

Side tables — the contracts other stages write (Parquet; extra columns are ignored; keys unique;
numbers finite; a table may cover a subset of the dataset's steps — steps without a row show "—"):

ε-labels (``data/labels.parquet`` by default, written by the label stage):
    traj_id   string   trajectory id of the dataset
    step_id   integer  ≥ 0, step within the trajectory
    mse       float    mean squared pixel difference of (s, s') after downscaling (0–255 pixels)
    label     string   "Yes" (mse > ε: the action changed the screen) or "No"
    epsilon   float    optional: the ε used, shown beside the label
    key (traj_id, step_id). Terminal transitions may be absent (digiq.labels labels only non-terminal ones).

Critic output folder (``--critic DIR``, written by the critic stage):
    DIR/step_scores.parquet — one row per scored step, key (traj_id, step_id):
        traj_id, step_id
        v          float  V(s), the critic's state value (e.g. min of the two V heads)
        q          float  Q(s, a_data) of the dataset action
        advantage  float  A(s, a_data) as the critic defines it (e.g. Q − V)
        td_error   float  r + γ(1 − done)·V̄(s') − Q(s, a_data): target minus prediction;
                          the index's "critic error" is the mean |td_error| over a trajectory's steps
    DIR/candidate_scores.parquet — optional, one row per candidate, key (traj_id, step_id, cand_idx):
        traj_id, step_id
        cand_idx   integer  ≥ 0; 0 = the dataset action (as in the candidates stage's table)
        action     string   the candidate in the AutoUI action string form (digiq.actions.format_action)
        q          float    Q(s, candidate)
    The page shows the top ``top_k`` candidates by q (ties: lower cand_idx first), plus cand 0's rank.
    DIR/channel_scores.parquet — optional: how much V and each candidate's Q change when one input channel is set
        to its training mean (``digiq.viewer.contributions`` has the contract); a VLM-only critic has nothing to
        attribute and its pages say so.

Policy output folder (``--policy DIR``, written by the actor stage):
    DIR/policy_scores.parquet — key (traj_id, step_id, cand_idx):
        traj_id, step_id, cand_idx, action   as in candidate_scores
        prob       float  in [0, 1]: the policy's probability of the candidate
        chosen     bool   the candidate the policy picks; at most one per step
    The page shows the pick, its probability and the top ``top_k`` candidates by prob.

Action strings are parsed only for the rows a page shows (top-k, cand 0, the pick); a malformed one is
an error naming the file and the ``action`` column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["SiteSummary", "ViewParams", "build_site", "make_server"]

if TYPE_CHECKING:
    from digiq.viewer.options import ViewParams
    from digiq.viewer.site import SiteSummary, build_site, make_server


def __getattr__(name: str) -> Any:  # lazy, so `from digiq.viewer.options import ViewParams` stays light
    if name == "ViewParams":
        from digiq.viewer.options import ViewParams

        return ViewParams
    if name in ("SiteSummary", "build_site", "make_server"):
        from digiq.viewer import site

        return getattr(site, name)
    raise AttributeError(name)
