"""Hugging Face model cards: the YAML metadata block (license, base model, library, tags) a model's README opens
with, so that the Hub and ``huggingface_hub.ModelCard.load`` read what a checkpoint folder is."""

from __future__ import annotations

from collections.abc import Sequence

LICENSE = "apache-2.0"  # the project's licence (LICENSE); the pretrained pieces are Apache-2.0 as well
LIBRARY = "transformers"
PIPELINE_TAG = "image-text-to-text"  # a LLaVA: screenshot + prompt in, text ("Yes"/"No") out
TAGS = ("digi-q", "llava")


def model_card(body: str, *, base_model: str | Sequence[str], tags: Sequence[str] = ()) -> str:
    """``body`` (Markdown) under its metadata block, checked by huggingface_hub's parser; same input, same text."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(license=LICENSE, base_model=base_model if isinstance(base_model, str) else list(base_model),
                         library_name=LIBRARY, pipeline_tag=PIPELINE_TAG, tags=[*TAGS, *tags])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
