"""The settings: one pydantic section per DVC stage, each field declared once with its one-line description.

These sections are the library's configs (stages pass them to the library as they are); params.yaml is generated
from them and read back by :mod:`digiq.params_file`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from digiq.channels import ChannelsParams, Inputs
from digiq.digirl import DigirlParams
from digiq.regime import RegimeParams
from digiq.envs.behavior import IMPATIENT, scores_with
from digiq.errors import DigiqError
from digiq.evaluate import EvaluateParams
from digiq.report import ReportParams
from digiq.viewer.options import ViewParams


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


WEB_ACTION_KINDS = ("tap", "swipe", "type", "press_enter", "complete")  # PRESS_BACK/HOME do not exist on MiniWoB


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
    episodes_per_task: int = Field(70, ge=1, description="episodes collected per task")
    seed: int = Field(0, ge=0, description="base seed; episode e of task t uses a seed derived from it")
    workers: int = Field(2, ge=1, description="parallel browser processes")
    executor: Literal["local", "ray"] = Field("local", description="where the browsers run: local (processes of this machine) or ray "
                                                               "(actors on the cluster at RAY_ADDRESS, else a local Ray; the digiq[ray] extra)")
    max_steps: int = Field(8, ge=1, description="episode length cap (steps)")
    noise: float = Field(0.3, ge=0.0, le=1.0, description="behaviour policy temperature / noise level")
    behavior: dict[str, float] = Field(
        default_factory=lambda: dict(IMPATIENT),
        description="π_β's heuristic weights changed from digiq/envs/behavior.py Scores, for collection, candidates and evaluation alike "
                    "(submit_partial 1.5: an impatient π_β that presses the button of a partly filled form; {}: the patient π_β; docs/results.md)")
    history: int = Field(1, ge=0, description="previous actions quoted in the observation text (official Digi-Q: 1)")
    shard_episodes: int = Field(10, ge=1, description="episodes per shard (the unit of resumption)")
    time_limit_s: float = Field(60.0, gt=0, description="MiniWoB episode clock in seconds (its default 10 s times out slow steps)")
    hang_timeout_s: float = Field(120.0, gt=0, description="a worker silent this long is killed and its shard redone")
    success_band: tuple[float, float] = Field((0.2, 0.6), description="data check: episode success rate must lie in this band")
    required_action_kinds: list[str] = Field(default_factory=lambda: ["tap", "type", "press_enter"], description="data check: action kinds the data must contain")
    out: str = Field("data/raw", description="dataset folder written by the stage")
    metrics: str = Field("metrics/collect.json", description="stage metrics")
    checks: str = Field("data/checks/collect", description="Data Docs of the raw-data checks (outside out: their timestamps would change the dataset's hash)")

    @field_validator("tasks")
    @classmethod
    def _known_distinct_tasks(cls, tasks: list[str]) -> list[str]:
        from digiq.envs.miniwob import check_tasks

        try:
            check_tasks(distinct(tasks, "tasks"))
        except DigiqError as exc:
            raise ValueError(exc.message) from None
        return tasks

    @field_validator("success_band")
    @classmethod
    def _success_band(cls, band: tuple[float, float]) -> tuple[float, float]:
        return _check_band(band)

    @field_validator("required_action_kinds")
    @classmethod
    def _web_action_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = set(kinds) - set(WEB_ACTION_KINDS)
        if unknown:
            raise ValueError(f"unknown action kind(s) {sorted(unknown)} (known: {list(WEB_ACTION_KINDS)})")
        return kinds

    @field_validator("behavior")
    @classmethod
    def _behavior(cls, overrides: dict[str, float]) -> dict[str, float]:
        try:
            scores_with(overrides)
        except DigiqError as exc:  # pydantic reports a ValueError with the file and the dotted field
            raise ValueError(f"{exc.field}: {exc.message}") from None
        return overrides


class LabelParams(Section):
    epsilon: float = Field(30.0, gt=0, description="ε: label Yes when the downscaled pixel MSE exceeds it")
    scale: float = Field(0.25, gt=0, le=1, description="downscale factor before the MSE (official: 0.25)")
    yes_band: tuple[float, float] = Field((0.15, 0.85), description="allowed Yes fraction overall, and per action kind unless overridden (gate)")
    kind_bands: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"swipe": (0.0, 0.85), "press_enter": (0.0, 0.85)},
        description="per-action-kind Yes bands overriding yes_band",
    )
    min_count: int = Field(30, ge=1, description="action kinds with fewer labelled transitions are reported, not gated")
    resample: Literal["box", "bilinear", "bicubic", "lanczos", "nearest"] = Field("box", description="PIL filter for the downscale (box: exact block mean)")
    sweep_epsilons: list[float] = Field(default_factory=lambda: [5.0, 10.0, 20.0, 30.0, 50.0, 80.0], description="ε values of plots/label_sweep.csv")
    out: str = Field("data/labels.parquet", description="label table")
    metrics: str = Field("metrics/label.json", description="stage metrics")
    checks: str = Field("data/checks/label", description="Data Docs of the label-balance gate")
    plots: str = Field("plots", description="folder of label_sweep.csv (and label_sweep.png with --sweep)")

    @field_validator("yes_band")
    @classmethod
    def _band(cls, band: tuple[float, float]) -> tuple[float, float]:
        return _check_band(band)

    @field_validator("kind_bands")
    @classmethod
    def _bands(cls, bands: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return {kind: _check_band(band, kind) for kind, band in bands.items()}

    @field_validator("sweep_epsilons")
    @classmethod
    def _epsilons(cls, epsilons: list[float]) -> list[float]:
        if not all(math.isfinite(e) and e >= 0 for e in epsilons):
            raise ValueError(f"ε values must be finite numbers >= 0, got {epsilons}")
        return epsilons

    def band(self, kind: str) -> tuple[float, float]:
        """The gate's allowed Yes fraction for one action kind."""
        return tuple(self.kind_bands.get(kind, self.yes_band))  # type: ignore[return-value]


def distinct(values: list[str], what: str) -> list[str]:
    """``values`` when there is at least one and none repeats (a validator's check)."""
    if not values:
        raise ValueError(f"no {what} given")
    if len(set(values)) != len(values):
        raise ValueError(f"{what} repeat: {values}")
    return values


def _check_band(band: tuple[float, float], name: str = "band") -> tuple[float, float]:
    low, high = band
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"{name} {list(band)} must satisfy 0 <= low <= high <= 1")
    return band


class ModelParams(Section):
    base: str = Field("models/base", description="checkpoint folder: models/base (the embedded default, built by `digiq model build`) or a local HF LLaVA checkpoint")
    image_size: int = Field(112, ge=14, description="working resolution of the embedded default's vision tower")
    seed: int = Field(0, ge=0, description="seed for building the embedded default")
    prompt_order: Literal["image_first", "state_first"] = Field("state_first", description="screenshot before (image_first, LLaVA's form) or after (state_first) the state text in every prompt; recorded in the built model's config.json, which finetune, embed and evaluate follow")
    text_model: Literal["llama", "minilm"] = Field("llama", description="language model of the embedded default: llama (seeded random layers) or minilm (all-MiniLM-L6-v2's pretrained layers run as a decoder; its finetune.target_modules: docs/experiments.md)")
    tap_target: bool = Field(False, description="tap prompts name the control under the tap (its DOM text); recorded in the built model's config.json like prompt_order")
    field_values: bool = Field(False, description="the state text quotes what the page's text fields hold (their DOM values); recorded like tap_target")


Variant = Literal["finetuned", "off_the_shelf", "no_vlm"]


class CandidatesParams(Section):
    """The `candidates` section of params.yaml."""


    k: int = Field(64, ge=1, description="candidates per state, index 0 the dataset action (paper: 64)")
    seed: int = Field(0, ge=0, description="base seed; each state's draws are seeded by (seed, traj_id, step_id)")
    noise: float = Field(0.3, ge=0.0, le=1.0, description="π_β uniform-noise mix used for sampling")
    min_mean_distinct: float = Field(4.0, ge=0.0, description="gate: mean distinct actions per state at least this")
    min_frac_two_distinct: float = Field(0.9, ge=0.0, le=1.0, description="gate: fraction of states with ≥ 2 distinct actions at least this")
    out: str = Field("data/candidates.parquet", description="candidate table written by the stage")
    metrics: str = Field("metrics/candidates.json", description="stage metrics")
    checks: str = Field("data/checks/candidates", description="Data Docs of the action-diversity gate")


def validated(model: type[BaseModel], values: dict[str, Any], section: str) -> Any:
    """``model(**values)`` or one DigiqError naming the first bad field (``section.field``)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join([section, *(str(part) for part in error["loc"])])
        raise DigiqError(error["msg"], field=field) from None


class EmbedParams(Section):
    """The `embed` section of params.yaml."""

    variant: Variant = Field("finetuned", description="which features: finetuned | off_the_shelf | no_vlm")
    variants: list[Variant] = Field(default_factory=lambda: ["finetuned", "off_the_shelf", "no_vlm"],
                                    description="foreach items of the embed stage")
    models: dict[str, str] = Field(
        default_factory=lambda: {"finetuned": "models/finetuned", "off_the_shelf": "models/base", "no_vlm": "models/base"},
        description="checkpoint folder per variant (no_vlm uses that model's vision tower only)")
    layer: int = Field(2, description="hidden_states index of the LM layer read (0 = embeddings, -1 = last)")
    pooling: Literal["last", "mean"] = Field("last", description="last token or mean over tokens")
    batch_size: int = Field(64, ge=1, description="prompts (or screenshots) per forward pass")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="compute dtype; auto: bf16 where the hardware has bf16 instructions, else float32 (float16 on a GPU without bf16), or $DIGIQ_DTYPE when set")
    quantize: Literal["auto", "none", "int8"] = Field("auto", description="the frozen language model's linear weights: int8 (dynamic quantization, CPU, float32 compute dtype) or none; auto: int8 where the float32 compute dtype is the machine's choice (auto or $DIGIQ_DTYPE) on an x86 CPU with AVX2, else none (bf16 hardware keeps bf16), or $DIGIQ_QUANTIZE when set")
    device: str = Field("auto", description="auto | cpu | cuda")
    chunk_states: int = Field(64, ge=1, description="states per resumable part file")
    candidates: str = Field("data/candidates.parquet", description="candidate table (stage candidates)")
    out: str = Field("data/embeddings", description="root: one <variant>/ folder of tables each")
    parts: str = Field("data/embeddings/.parts", description="resumable chunk files, one <variant>/ folder each")
    metrics: str = Field("metrics", description="folder of embed-<variant>.json")


class FinetuneParams(Section):
    """The `finetune` section of params.yaml."""

    mode: Literal["lora", "full"] = Field("lora", description="lora: LoRA adapters on the language model + the projector; full: every language-model and projector weight (small default only)")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", description="LoRA targets: module-name regex or list of names (language model only; the vision tower stays frozen)")
    marker: Literal["patch", "draw", "none"] = Field("patch", description="how a tap's location enters the prompt: 'patch' (the projected patch under the point, no re-encoding) or 'none'")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    epochs: int = Field(4, ge=1, description="passes over the training split")
    batch_size: int = Field(16, ge=1, description="transitions per optimizer step")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of trajectories held out for validation (split by trajectory)")
    seed: int = Field(0, ge=0, description="seeds the split, LoRA init and batch order")
    probe_layer: int = Field(2, description="hidden_states layer of the frozen off-the-shelf model for the linear-probe baseline (last token of the prompt)")
    checkpoint_every: int = Field(20, ge=1, description="optimizer steps between checkpoints (plus one per epoch)")
    checkpoint_dir: str = Field("models/finetune-ckpt", description="checkpoint folder (resume after an interruption)")
    max_train_seconds: float = Field(1800.0, gt=0, description="safety cap on training wall time: a run that hits it stops, says so and records completed: false")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="compute dtype (autocast over float32 master weights); auto: bf16 where the hardware has bf16 instructions, else float32, or $DIGIQ_DTYPE when set")
    device: str = Field("auto", description="auto (cuda when visible) | cpu | cuda | cuda:N; under accelerate launch each process takes its own GPU")
    base_dtype: Literal["float32", "bfloat16"] = Field("float32", description="storage dtype of the frozen base weights (bfloat16 halves a 7B model's memory; LoRA mode only, the trained weights stay float32)")
    out: str = Field("models/finetuned", description="output folder: merged model + adapter/ + README.md")
    metrics: str = Field("metrics/finetune.json", description="metrics file")
    live_dir: str = Field("dvclive/finetune", description="DVCLive folder (per-epoch plots)")

    @field_validator("base_dtype")
    @classmethod
    def _only_a_frozen_base_in_bf16(cls, value: str, info: Any) -> str:
        if value != "float32" and info.data.get("mode") != "lora":
            raise ValueError(f"mode {info.data.get('mode')} would train weights stored in {value}; "
                             "use mode lora (the base stays frozen) or base_dtype float32")
        return value


class FeaturesParams(Section):
    repo: str = Field("features", description="the Feast repository folder")
    variant: str = Field("finetuned", description="embedding variant served: data/embeddings/<variant>/ (finetuned, off_the_shelf, no_vlm, ...)")
    embeddings: str = Field("data/embeddings", description="folder holding one sub-folder of embedding tables per variant")
    derived: str = Field("data/features", description="the stage's derived sources (transitions, labels, candidate blocks), one <variant>/ folder each: what training sets read")
    metrics: str = Field("metrics/features.json", description="stage output: rows materialized and timings")
    online_store: dict[str, Any] = Field(default_factory=lambda: {"type": "sqlite"}, description="Feast online store: {type: sqlite} (a file per variant under the repository) or e.g. {type: redis, connection_string: 'localhost:6379'} (docs/features.md)")


class CriticParams(Section):
    target: Literal["td", "mc"] = Field("td", description="td: bootstrapped targets; mc: regress on the discounted return")
    tau: float = Field(0.1, gt=0, le=1, description="Polyak rate of the target nets, θ̄ ← τθ + (1−τ)θ̄ (official 0.1)")
    lrs: list[float] = Field(default_factory=lambda: [1e-3, 3e-4, 1e-4], min_length=1, description="Adam learning rates tried, one critic each; the best on held-out returns is kept (the first also trains a critic built outside a grid; official 1e-3)")
    grad_clip: float = Field(0.01, gt=0, description="max grad norm per head pair (official 0.01)")
    batch_size: int = Field(128, ge=1, description="transitions per update (official 128)")
    hidden: list[int] = Field(default_factory=lambda: [256, 256], description="hidden widths of each Q/V MLP")
    updates: int = Field(800, ge=1, description="gradient updates per critic of the lr grid (epochs = updates · batch_size / n_transitions); the kept update may be earlier (select)")
    log_every: int = Field(25, ge=1, description="updates per logged point (metrics are averaged over the window; held-out losses and best_val candidates)")
    select: Literal["best_return", "best_td", "last"] = Field("best_return", description="weights kept: the logged point with the lowest held-out return error (best_return) or TD loss (best_td, the official validation curve), or the last update")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of trajectories held out to validate the critic")
    device: str = Field("auto", description="auto (cuda when visible) | cpu | cuda | cuda:N")
    out: str = Field("models/critic", description="critic folder: weights, config, step and candidate scores")
    metrics: str = Field("metrics/critic.json", description="stage metrics")
    live_dir: str = Field("dvclive/critic", description="DVCLive folder of the training curves")
    checkpoint_every: int = Field(500, ge=1, description="updates between checkpoints (models/critic.ckpt: a killed run resumes from it)")
    cql_alpha: float = Field(0.0, ge=0.0, description="weight of the conservative (CQL) term over π_β's candidates; 0: off, as in the paper")
    standardize: bool = Field(True, description="standardise the heads' input features (training mean/std, saved with the weights); false: raw features, as the official code")
    inputs: Inputs = Field(default_factory=Inputs, description="channels of Q's and V's inputs (digiq/channels.py); q: [vlm], v: [vlm] is the VLM-only critic")


Method = Literal["digiq", "bc", "filtered-bc", "awr", "awr-bon", "pg-bon", "reinforce", "digirl"]


class ActorParams(Section):
    methods: list[Method] = Field(default_factory=lambda: ["digiq", "bc", "filtered-bc", "awr", "awr-bon", "pg-bon", "reinforce", "digirl"], description="foreach stage items: digiq (Best-of-N) | bc | filtered-bc | awr (dataset action) | awr-bon | pg-bon (official AWR / PG on the Best-of-N action) | reinforce | digirl")
    inputs: Inputs = Field(default_factory=Inputs, description="channels of the scorer's input [x_V(s), x_Q(s, a_k)] (digiq/channels.py); evaluation composes the same")
    n: int = Field(16, ge=1, description="Best-of-N / REINFORCE: candidates scored per state, dataset action included, drawn afresh per update (paper 16 of 64)")
    threshold: float = Field(0.10, description="digiq: imitate the best candidate only if its advantage, clamped to [0, 1], exceeds this (official 0.10)")
    awr_beta: float = Field(0.05, gt=0, description="AWR temperature β in exp(A/β), awr and awr-bon (official class default 0.05)")
    awr_max_weight: float = Field(20.0, gt=0, description="awr / awr-bon: weights are clipped at this value (the official awr has no cap)")
    pg_multiplier: float = Field(5.0, gt=0, description="pg-bon: W = clamp(A, 0, 1) · this (official shipped config 5)")
    anchor: float = Field(0.3, ge=0.0, description="weight of the penalty mean g² over every batch state's valid candidates, keeping π at π_β where nothing is imitated; chosen by the lowest held-out target cross-entropy (metrics heldout_target_ce) over 0, 0.1, 0.3, 1, 3; 0: off")
    use_state: bool = Field(True, description="score [f(s), f(s,a)] or f(s,a) alone")
    behavior_prior: bool = Field(True, description="π ∝ (π_β draws a candidate stands for) · exp(score); false: plain softmax over distinct candidates")
    hidden: list[int] = Field(default_factory=lambda: [256, 256], description="scorer MLP widths")
    standardize: bool = Field(False, description="standardise the scorer's inputs; on the default data it made digiq imitate the critic's picks more closely and score lower (docs/results.md)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    grad_clip: float = Field(1.0, gt=0, description="max global grad norm")
    batch_size: int = Field(128, ge=1, description="states per update")
    updates: int = Field(1000, ge=1, description="gradient updates")
    log_every: int = Field(50, ge=1, description="updates per logged point (window means)")
    device: str = Field("auto", description="auto | cpu | cuda")
    out: str = Field("models/actor", description="policy folders, one sub-folder per method")
    metrics: str = Field("metrics/actor", description="stage metrics, one <method>.json each")
    live_dir: str = Field("dvclive/actor", description="DVCLive folders of the training curves, one sub-folder per method")


class Params(Section):
    seed: int = Field(0, ge=0, description="global seed")
    gamma: float = Field(0.5, ge=0.0, le=1.0, description="discount γ of returns and TD targets (official 0.95; why 0.5 here: docs/results.md, 'Settings and why')")
    collect: CollectParams = Field(default_factory=CollectParams)
    label: LabelParams = Field(default_factory=LabelParams)
    model: ModelParams = Field(default_factory=ModelParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    candidates: CandidatesParams = Field(default_factory=CandidatesParams)
    embed: EmbedParams = Field(default_factory=EmbedParams)
    channels: ChannelsParams = Field(default_factory=ChannelsParams)
    features: FeaturesParams = Field(default_factory=FeaturesParams)
    critic: CriticParams = Field(default_factory=CriticParams)
    actor: ActorParams = Field(default_factory=ActorParams)
    digirl: DigirlParams = Field(default_factory=DigirlParams)
    regime: RegimeParams = Field(default_factory=RegimeParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)
    view: ViewParams = Field(default_factory=ViewParams)
