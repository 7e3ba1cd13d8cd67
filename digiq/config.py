"""Configuration: pydantic models mirroring params.yaml, one section per DVC stage.

Every CLI option defaults to the value here (read from params.yaml); unknown keys are refused with a
"did you mean" hint, wrong types with the file and the dotted field.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from digiq.errors import DigiqError
from digiq.evaluate import EvaluateParams
from digiq.report import ReportParams
from digiq.viewer.options import ViewParams

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CollectParams(Section):
    tasks: list[str] = Field(
        default_factory=lambda: [
            "click-button",
            "click-link",
            "click-tab-2",
            "click-checkboxes",
            "choose-list",
            "enter-text",
            "login-user",
            "use-autocomplete",
        ],
        description="MiniWoB++ task names (without the miniwob/ prefix and -v1 suffix)",
    )
    episodes_per_task: int = Field(60, ge=1, description="episodes collected per task")
    seed: int = Field(0, ge=0, description="base seed; episode e of task t uses a seed derived from it")
    workers: int = Field(2, ge=1, description="parallel browser processes")
    max_steps: int = Field(8, ge=1, description="episode length cap (steps)")
    noise: float = Field(0.3, ge=0.0, le=1.0, description="behaviour policy temperature / noise level")
    out: str = Field("data/raw", description="dataset folder written by the stage")


class LabelParams(Section):
    epsilon: float = Field(30.0, gt=0, description="ε: label Yes when the downscaled pixel MSE exceeds it")
    scale: float = Field(0.25, gt=0, le=1, description="downscale factor before the MSE (official: 0.25)")
    yes_band: tuple[float, float] = Field((0.15, 0.85), description="allowed Yes fraction overall, and per action kind unless overridden (gate)")
    kind_bands: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"swipe": (0.0, 0.85), "press_enter": (0.0, 0.85)},
        description="per-action-kind Yes bands overriding yes_band (swipes and Enter rarely change a MiniWoB page)",
    )
    min_count: int = Field(30, ge=1, description="action kinds with fewer labelled transitions are reported, not gated")
    resample: Literal["box", "bilinear", "bicubic", "lanczos", "nearest"] = Field("box", description="PIL filter for the downscale (box: exact block mean)")
    sweep_epsilons: list[float] = Field(default_factory=lambda: [5.0, 10.0, 20.0, 30.0, 50.0, 80.0], description="ε values of plots/label_sweep.csv")
    out: str = Field("data/labels.parquet", description="label table")

    @field_validator("yes_band")
    @classmethod
    def _band(cls, band: tuple[float, float]) -> tuple[float, float]:
        return _check_band(band)

    @field_validator("kind_bands")
    @classmethod
    def _bands(cls, bands: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return {kind: _check_band(band) for kind, band in bands.items()}


def _check_band(band: tuple[float, float]) -> tuple[float, float]:
    low, high = band
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"band {list(band)} must satisfy 0 <= low <= high <= 1")
    return band


class ModelParams(Section):
    base: str = Field("models/base", description="'models/base' (embedded default, built by a stage) or a local HF LLaVA checkpoint path")
    image_size: int = Field(112, ge=14, description="working resolution of the embedded default's vision tower")
    seed: int = Field(0, ge=0, description="seed for building the embedded default")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="'auto' picks bf16 only where it is faster")


class FeaturesParams(Section):
    repo: str = Field("features", description="the Feast repository folder")
    variant: str = Field("finetuned", description="embedding variant served: data/embeddings/<variant>/ (finetuned, off_the_shelf, no_vlm, ...)")
    embeddings: str = Field("data/embeddings", description="folder holding one sub-folder of embedding tables per variant")
    metrics: str = Field("metrics/features.json", description="stage output: rows materialized and timings")


class CriticParams(Section):
    target: Literal["td", "mc"] = Field("td", description="td: bootstrapped targets; mc: regress on the discounted return")
    tau: float = Field(0.1, gt=0, le=1, description="Polyak rate (official 0.1)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (official 1e-3)")
    grad_clip: float = Field(0.01, gt=0, description="max grad norm per head pair (official 0.01)")
    batch_size: int = Field(128, ge=1, description="transitions per update (official 128)")
    hidden: list[int] = Field(default_factory=lambda: [256, 256], description="hidden widths of each Q/V MLP")
    updates: int = Field(3000, ge=1, description="gradient updates")
    log_every: int = Field(50, ge=1, description="updates per logged point")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of trajectories held out to validate the critic")
    device: str = Field("auto", description="auto | cpu | cuda")
    out: str = Field("models/critic", description="critic folder")


class ActorParams(Section):
    methods: list[str] = Field(default_factory=lambda: ["digiq", "bc", "filtered-bc", "awr", "reinforce"], description="foreach stage items")
    n: int = Field(16, ge=1, description="Best-of-N candidates per state (paper 16 of 64)")
    threshold: float = Field(0.10, description="keep the best candidate if A > threshold (official 0.10)")
    awr_beta: float = Field(0.05, gt=0, description="AWR temperature β (official 0.05)")
    awr_max_weight: float = Field(20.0, gt=0, description="AWR weight clip")
    use_state: bool = Field(True, description="score [f(s), f(s,a)] or f(s,a) alone")
    hidden: list[int] = Field(default_factory=lambda: [256, 256], description="scorer MLP widths")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(128, ge=1, description="states per update")
    updates: int = Field(1000, ge=1, description="gradient updates")
    device: str = Field("auto", description="auto | cpu | cuda")
    out: str = Field("models/actor", description="one sub-folder per method")


class Params(Section):
    seed: int = Field(0, ge=0, description="global seed")
    gamma: float = Field(0.95, ge=0.0, le=1.0, description="discount γ (official 0.95)")
    collect: CollectParams = Field(default_factory=CollectParams)
    label: LabelParams = Field(default_factory=LabelParams)
    model: ModelParams = Field(default_factory=ModelParams)
    features: FeaturesParams = Field(default_factory=FeaturesParams)
    critic: CriticParams = Field(default_factory=CriticParams)
    actor: ActorParams = Field(default_factory=ActorParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)
    view: ViewParams = Field(default_factory=ViewParams)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; a missing file gives the defaults."""
    import yaml

    path = Path(path)
    if not path.exists():
        return Params()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DigiqError(f"invalid YAML ({exc})", file=path) from None
    if not isinstance(raw, dict):
        raise DigiqError("expected a mapping of sections at the top level", file=path)
    return validate_params(raw, path)


def validate_params(raw: dict[str, Any], path: str | Path = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(p) for p in problem["loc"])
        if problem["type"] == "extra_forbidden":
            raise DigiqError(f"unknown key{_did_you_mean(problem['loc'])}", file=path, field=field) from None
        raise DigiqError(f"{problem['msg']} (got {problem.get('input')!r})", file=path, field=field) from None


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def params_yaml(params: Params | None = None) -> str:
    """params.yaml text for the given (default) params, with each field's description as a comment."""
    params = params or Params()
    lines: list[str] = []
    for name, field in Params.model_fields.items():
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            lines.append(f"{name}:")
            lines.extend(f"  {_yaml_line(sub, getattr(value, sub), subfield.description)}" for sub, subfield in type(value).model_fields.items())
        else:
            lines.append(_yaml_line(name, value, field.description))
    return "\n".join(lines) + "\n"


def _yaml_line(key: str, value: Any, description: str | None) -> str:
    import yaml

    from pydantic_core import to_jsonable_python

    value = to_jsonable_python(value)  # nested models, tuples -> plain YAML types
    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    text = yaml.dump(value, Dumper=_NoAliases, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("...").strip()
    comment = f"  # {description}" if description else ""
    return f"{key}: {text}{comment}"
