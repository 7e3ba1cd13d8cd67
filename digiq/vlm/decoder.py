"""The language model of a LLaVA-style VLM, run part-way: features at layer ``k`` need only the first ``k`` decoder
layers, so the others are dropped for the call; the hidden states of the layers asked for are captured with forward
hooks, and the key/value cache of a token prefix shared by many rows is expanded to all of them. Layers are
numbered as in :mod:`digiq.vlm.model` (``hidden_states`` of Hugging Face models).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DecoderStack:
    owner: Any  # the module holding the layer list
    layers: str  # its attribute name
    raw_embeddings: bool  # hidden_states[0] is the token embedding itself (Llama) rather than a module's output


def decoder_stack(lm: Any) -> DecoderStack | None:
    """Where the decoder layers of a language model are: a Llama-style ``.layers`` + ``.norm``, or a BERT run as a
    decoder (``.encoder.layer``; its embedding module adds positions and a LayerNorm, and it has no final norm)."""
    if hasattr(lm, "layers") and hasattr(lm, "norm"):
        return DecoderStack(lm, "layers", raw_embeddings=True)
    encoder = getattr(lm, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer") and getattr(lm.config, "is_decoder", False):
        return DecoderStack(encoder, "layer", raw_embeddings=False)
    return None


@contextlib.contextmanager
def _capture_embeddings(lm: Any, wanted: bool, into: dict[int, Any]) -> Iterator[None]:
    """Record the embedding module's output as hidden state 0 (a BERT adds positions and a norm there)."""
    if not wanted:
        yield
        return
    handle = lm.embeddings.register_forward_hook(lambda _m, _a, output: into.__setitem__(0, output))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _capture(layers: Any, wanted: list[int], into: dict[int, Any]) -> Iterator[None]:
    """Record the output of decoder layer ``k - 1`` as hidden state ``k`` for each wanted ``k``."""
    handles = []
    for k in wanted:
        def hook(_module: Any, _args: Any, output: Any, k: int = k) -> None:
            into[k] = output[0] if isinstance(output, tuple) else output
        handles.append(layers[k - 1].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Decoder:
    """A language model and where its decoder layers are (:func:`decoder_stack`)."""

    def __init__(self, lm: Any, stack: DecoderStack):
        self.lm, self.stack = lm, stack
        self.num_layers = len(self.layers)
        self.cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    @property
    def layers(self) -> Any:
        return getattr(self.stack.owner, self.stack.layers)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.lm.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def run(self, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None, layers: list[int],
            depth: int, need_final: bool, truncate: bool, cache: Any = None) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Run the language model to ``depth`` layers; return {layer: hidden [B, T, d]} and the final normed
        hidden states (when ``need_final``)."""
        if depth == 0 and not need_final and self.stack.raw_embeddings:  # the embedding layer alone
            return {0: embeds}, None
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids,
                                  "use_cache": cache is not None}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if not truncate:
            out = self.lm(**kwargs, output_hidden_states=True)
            return {k: out.hidden_states[k] for k in layers}, out.last_hidden_state
        captured: dict[int, torch.Tensor] = {}
        wanted = [k for k in layers if 0 < k < self.num_layers]
        with self.truncated(depth), _capture(self.layers, wanted, captured), \
                _capture_embeddings(self.lm, 0 in layers and not self.stack.raw_embeddings, captured):
            out = self.lm(**kwargs)
        hidden = {}
        for k in layers:
            hidden[k] = captured.get(k, embeds) if k == 0 else out.last_hidden_state if k == self.num_layers else captured[k]
        return hidden, (out.last_hidden_state if need_final else None)

    @contextlib.contextmanager
    def truncated(self, depth: int) -> Iterator[None]:
        """Temporarily keep only the first ``depth`` decoder layers (and drop the final norm when depth < all)."""
        import torch

        if depth >= self.num_layers:
            yield
            return
        owner, name = self.stack.owner, self.stack.layers
        layers = getattr(owner, name)
        norm = getattr(self.lm, "norm", None)
        setattr(owner, name, torch.nn.ModuleList(list(layers)[:depth]))
        if norm is not None:
            self.lm.norm = torch.nn.Identity()
        try:
            yield
        finally:
            setattr(owner, name, layers)
            if norm is not None:
                self.lm.norm = norm


def expand_cache(prefix_cache: Any, n: int, new: Any) -> Any:
    """A cache holding the prefix's keys/values for ``n`` rows (the prefix cache itself stays untouched)."""
    layers = getattr(prefix_cache, "layers", None)
    if layers is not None:
        entries = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    else:  # older transformers
        entries = list(zip(prefix_cache.key_cache, prefix_cache.value_cache, strict=True))
    for idx, (k, v) in enumerate(entries):
        if k is None or v is None or k.numel() == 0:
            continue
        new.update(k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:]), idx)
    return new
