"""Settings of `digiq view` (the ``view:`` section of params.yaml).

Kept here, importing only pydantic, so that digiq/config.py can embed it as ``Params.view`` without
pulling the viewer in.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ViewParams(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    out: str = Field("reports/view", description="folder the static viewer site is written to (replaced as a whole)")
    critic: str | None = Field(None, description="critic output folder (step_scores.parquet, candidate_scores.parquet); null: none")
    policy: str | None = Field(None, description="policy output folder (policy_scores.parquet); null: none")
    top_k: int = Field(5, ge=1, le=64, description="candidates shown per step, ranked by Q (critic) or probability (policy)")
    page_size: int = Field(50, ge=10, le=1000, description="trajectories per page of the index")
    port: int = Field(8000, ge=0, le=65535, description="port of `digiq view --serve` on 127.0.0.1 (0: any free port)")
