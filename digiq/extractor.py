"""The feature extractor: a frozen VLM turned into f(s) for a state and f(s, a) for a state-action pair.

What is computed (Digi-Q §4.2):

- f(s)    = pool_ℓ( LM( [image tokens(s)] + state_prompt(goal, observation) ) )
- f(s, a) = pool_ℓ( LM( [image tokens(s)] + prompt(goal, observation, a) ) ),  the action's tap point entering as
  the image token of the patch under it (``marker="patch"``: the screenshot is encoded once per state);
  ``pool_ℓ`` = the last token (``pooling="last"``) or the mean over tokens (``"mean"``) of hidden layer ℓ.
- ``no_vlm`` (ablation, :class:`VisionOnlyExtractor`): the raw vision-tower features, no language model:
  f(s) = mean over patches of v(s);  f(s, a) = mean(v(s)) ⊕ v(s)[patch under a's first point] (zeros when the
  action has no point) ⊕ enc(a), enc(a) = one-hot(kind, 7) ⊕ (touch y, x, lift y, x) ⊕ a 16-bucket hashed
  character-trigram bag of the typed text (L2-normalised).

:func:`build_extractor` is the one recipe shared by the embed job (:mod:`digiq.embed`, every stored state) and the
live featurizer of online evaluation (one state at a time, :func:`featurize`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from digiq.errors import DigiqError
from digiq.runtime import ComputeDtype, Quantization

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from digiq.schema import Action
    from digiq.vlm.model import VLM

Elements = list[dict[str, Any]] | None  # the DOM elements of a state (what a tap lands on), when known

ACTION_KINDS = ("tap", "swipe", "type", "press_enter", "press_back", "press_home", "complete")
TEXT_BUCKETS = 16


def model_hash(path: str | Path, extra: str = "") -> str:
    """sha256 (hex, 16 chars) of a checkpoint folder's config and weight files (+ ``extra``, e.g. the variant)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in {".safetensors", ".bin"} or p.name in {
        "config.json", "adapter_config.json"}))
    if not files:
        raise DigiqError("no config.json / weight files to hash", file=path)
    h = hashlib.sha256(extra.encode())
    for file in files:
        h.update(str(file.relative_to(path)).encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class Extractor(Protocol):
    """Turns screenshots + text into f(s) and f(s, a)."""

    dim_state: int
    dim_candidate: int
    reads_elements: bool  # whether states() and candidates() use the DOM elements (else they may be None)
    dtype: ComputeDtype | None  # the compute dtype and why (set by build_extractor)
    quantization: Quantization | None  # the language model's weights: none | int8, and why (set by build_extractor)

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor: ...  # one row per screenshot

    def states(self, tokens: torch.Tensor, goals: Sequence[str], observations: Sequence[str],
               elements: Sequence[Elements] | None = None) -> np.ndarray: ...

    def candidates(self, tokens: torch.Tensor, size: tuple[int, int], goal: str, observation: str,
                   actions: Sequence[Action], elements: Elements = None) -> np.ndarray: ...


class VLMExtractor:
    """f(s), f(s, a) from hidden layer ``layer`` of a LLaVA-style VLM (shared-prefix cached, screenshot encoded once)."""

    def __init__(self, vlm: VLM, layer: int = 2, pooling: str = "last", batch_size: int = 64):
        self.vlm, self.layer, self.pooling, self.batch_size = vlm, layer, pooling, batch_size
        self.dim_state = self.dim_candidate = int(vlm.hidden_size)
        self.reads_elements = vlm.reading.reads_elements
        self.dtype: ComputeDtype | None = None
        self.quantization: Quantization | None = None

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.vlm.encode_images(list(images), batch_size=self.batch_size)

    def states(self, tokens: torch.Tensor, goals: Sequence[str], observations: Sequence[str],
               elements: Sequence[Elements] | None = None) -> np.ndarray:
        from digiq.vlm.prompts import state_prompt

        import torch

        pages = elements if elements is not None else [None] * len(goals)
        prompts = [state_prompt(g, self.vlm.reading.observation(o, e), self.vlm.prompt_order)
                   for g, o, e in zip(goals, observations, pages, strict=True)]
        # one state per call, so that f(s) is the same bits whether a state comes alone (live featurization) or
        # with a chunk of others (the embed job): packed rows of several states, and int8's per-call activation
        # range, make a state's features depend on its neighbours in the last bits
        with torch.inference_mode():
            out = torch.cat([self.vlm.forward_features(tokens[i:i + 1], prompts[i:i + 1], layer=self.layer,
                                                       pooling=self.pooling, batch_size=self.batch_size)
                             for i in range(len(prompts))])
        return out.float().cpu().numpy()

    def candidates(self, tokens: torch.Tensor, size: tuple[int, int], goal: str, observation: str,
                   actions: Sequence[Action], elements: Elements = None) -> np.ndarray:
        from digiq.vlm.prompts import build_prompts

        import torch

        prompts = build_prompts(goal, self.vlm.reading.observation(observation, elements), actions,
                                self.vlm.reading.targets(actions, elements), marker="patch", order=self.vlm.prompt_order)
        with torch.inference_mode():
            out = self.vlm.forward_features(tokens, prompts, actions, layer=self.layer, pooling=self.pooling,
                                            image_sizes=[size], batch_size=self.batch_size)
        return out.float().cpu().numpy()


class VisionOnlyExtractor:
    """The "no VLM representation" ablation: raw vision-tower patch features (before the projector), no LM."""

    def __init__(self, vlm: VLM, batch_size: int = 64):
        self.vlm, self.batch_size = vlm, batch_size
        self.dim_vision = int(vlm.config.vision_config.hidden_size) * (
            1 if isinstance(vlm.feature_layer, int) else len(vlm.feature_layer))
        self.dim_state = self.dim_vision
        self.dim_candidate = 2 * self.dim_vision + len(ACTION_KINDS) + 4 + TEXT_BUCKETS
        self.reads_elements = False
        self.dtype: ComputeDtype | None = None
        self.quantization: Quantization | None = None

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        parts = [self.vlm.vision_features(list(images[i:i + self.batch_size]))
                 for i in range(0, len(images), self.batch_size)]
        return torch.cat(parts).float()

    def states(self, tokens: torch.Tensor, goals: Sequence[str], observations: Sequence[str],
               elements: Sequence[Elements] | None = None) -> np.ndarray:
        return self._patches(tokens).mean(1).cpu().numpy()

    def candidates(self, tokens: torch.Tensor, size: tuple[int, int], goal: str, observation: str,
                   actions: Sequence[Action], elements: Elements = None) -> np.ndarray:
        from digiq.vlm.inputs import action_points, patch_grid, patch_index, square_point

        patches = self._patches(tokens)[0].cpu().numpy()  # [n, dv]
        grid, offset = patch_grid(tokens.shape[1], self.vlm.strategy)
        mean = patches.mean(0)
        rows = []
        for action in actions:
            points = action_points(action)
            under = (patches[patch_index(square_point(points[0], size), grid)] if points
                     else np.zeros(self.dim_vision, np.float32))
            rows.append(np.concatenate([mean, under, action_encoding(action)]))
        return np.stack(rows).astype(np.float32)

    def _patches(self, tokens: torch.Tensor) -> torch.Tensor:
        offset = 1 if self.vlm.strategy == "full" else 0
        return tokens[:, offset:]


def build_extractor(variant: str, model_path: str | Path, *, layer: int, pooling: str, batch_size: int = 64,
                    dtype: str | ComputeDtype = "auto", device: str = "auto",
                    quantize: str = "auto") -> tuple[Extractor, str, str]:
    """(extractor, model hash, precision) of an embedding variant — the one recipe shared by the embed stage and
    the live featurizer of online evaluation, so that both compute the same f(s) and f(s, a).

    ``dtype`` and ``quantize`` are resolved here (:func:`digiq.runtime.resolve_dtype`, ``resolve_quantize``);
    the precision names both (``float32``, ``float32+int8``…) and the extractor keeps them (``.dtype``,
    ``.quantization``) for the run's records. ``no_vlm`` runs no language model, so nothing is quantized."""
    from digiq.runtime import resolve_device, resolve_dtype, resolve_quantize
    from digiq.vlm import load_vlm

    device = resolve_device(device)
    compute = dtype if isinstance(dtype, ComputeDtype) else resolve_dtype(dtype, device, setting="embed.dtype")
    quant = resolve_quantize(quantize, compute, device, setting="embed.quantize")
    if variant == "no_vlm" and quant.name != "none":
        quant = Quantization("none", "no_vlm runs no language model")
    vlm = load_vlm(model_path, dtype=compute.name, device=device, quantize=quant.name)
    precision = compute.name + ("" if quant.name == "none" else f"+{quant.name}")
    extractor: Extractor
    if variant == "no_vlm":
        extractor, digest = VisionOnlyExtractor(vlm, batch_size=batch_size), model_hash(model_path, extra="no_vlm")
    else:
        extractor, digest = VLMExtractor(vlm, layer, pooling, batch_size), model_hash(model_path)
    extractor.dtype, extractor.quantization = compute, quant
    return extractor, digest, precision


def featurize(extractor: Extractor, image: Image.Image, goal: str, observation: str,
              actions: Sequence[Action], elements: Elements = None) -> tuple[np.ndarray, np.ndarray]:
    """f(s) [d_s] and f(s, a_k) [K, d_sa] of one state, its screenshot encoded once (as the embed job does)."""
    tokens = extractor.encode([image])
    f_s = extractor.states(tokens, [goal], [observation], [elements])[0]
    return f_s, extractor.candidates(tokens, image.size, goal, observation, actions, elements)


def action_encoding(action: Action) -> np.ndarray:
    """one-hot(kind) ⊕ (touch y, x, lift y, x) ⊕ hashed character-trigram bag of the typed text (L2-normalised)."""
    kind = np.zeros(len(ACTION_KINDS), np.float32)
    kind[ACTION_KINDS.index(action.kind)] = 1.0
    touch = action.touch_point if action.touch_point is not None else (0.0, 0.0)
    lift = action.lift_point if action.lift_point is not None else (0.0, 0.0)
    text = np.zeros(TEXT_BUCKETS, np.float32)
    padded = f"  {action.typed_text or ''} "
    for i in range(len(padded) - 2) if action.typed_text else ():
        bucket = hashlib.sha256(padded[i:i + 3].encode()).digest()[0] % TEXT_BUCKETS
        text[bucket] += 1.0
    norm = float(np.linalg.norm(text))
    return np.concatenate([kind, np.array([*touch, *lift], np.float32), text / norm if norm else text])
