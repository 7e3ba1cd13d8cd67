"""A tiny LLaVA-1.5-shaped checkpoint for tests: the real loading path (local folder, AutoProcessor +
AutoModelForImageTextToText) on a model small enough to build, save and run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_tiny_llava(path: Path, text_layers: int = 3) -> Path:
    """CLIP vision tower (56 px, 14 px patches, feature layer -2, centre-cropping processor), a Llama LM with
    ``text_layers`` layers and the default model's tokenizer; seeded, so every call writes the same weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import CLIPImageProcessor

    from digiq.vlm.build import build_tokenizer

    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                      do_center_crop=True),
                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(path)
    return path


def set_config(folder: Path, **changes: object) -> None:
    """Rewrite keys of a saved checkpoint's config.json (e.g. its recorded prompt order)."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
