"""``VLM``: a LLaVA-style model plus its processor, with the fast paths Digi-Q needs.

The costly part of f(s, a) is the screenshot, and each state has up to K = 64 candidate actions (docs/pipeline.md). So:

1. :meth:`VLM.encode_images` runs the (frozen) vision tower and the projector **once per screenshot** and
   returns the projected image tokens ``[B, n_image_tokens, lm_hidden]``.
2. :meth:`VLM.forward` builds ``inputs_embeds`` by hand: the text tokens' embeddings, with the image-token
   positions replaced by the cached image tokens and each tap slot (``<tap>``, see :mod:`digiq.vlm.prompts`)
   replaced by the projected patch token under the action's point. No marker is drawn, nothing re-encoded.
3. Candidates of one state share everything up to "Action:" (image and state text). That token prefix is run
   through the language model once; its key/value cache is then shared by all candidates, which only run
   their own suffix (right-padded, so positions are those of the unbatched sequence).
4. Features at layer ``k`` need only the first ``k`` decoder layers: the others are skipped (:mod:`digiq.vlm.decoder`).
5. Last-token features without gradients (extraction) of a Llama-style LM run packed, with no padding tokens, and
   compute only the last token at the read layer (:mod:`digiq.vlm.packed`).

Layer numbering follows ``hidden_states`` of Hugging Face models: 0 is the embedding layer, ``k`` the output
of decoder layer ``k``, and the last one (``num_layers``) is after the final norm. Negative ``k`` counts from
the end (-1 = ``num_layers``).

Each row's features are those of its sequence computed alone (padding and batch composition do not change
them beyond float rounding); tests check the cached path against ``model(**processor(...))``.
Gradients flow when the caller enables them (LoRA fine-tuning); the vision tower always runs without.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from digiq.errors import DigiqError
from digiq.vlm import prompts as P
from digiq.vlm.decoder import Decoder, decoder_stack, expand_cache
from digiq.vlm.packed import PackedDecoder, packed_supported
from digiq.vlm.vision import LastCall, tower_features
from digiq.vlm.inputs import action_points, draw_tap_marker, pad_to_square, patch_grid, patch_index, square_point

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from digiq.schema import Action

Pooling = Literal["last", "mean"]
POOLINGS = ("last", "mean")
# the shared prefix is worth a separate pass only when it is at least this many tokens
MIN_PREFIX_TOKENS = 8


@dataclass
class VLMOutput:
    """``features[k]``: pooled hidden states at layer ``k``, float32 ``[B, hidden]``;
    ``yes_no``: logits of the "Yes" and "No" answer tokens, float32 ``[B, 2]`` (None unless asked for)."""

    features: dict[int, torch.Tensor] = field(default_factory=dict)
    yes_no: torch.Tensor | None = None


@dataclass
class _Row:
    ids: list[int]
    sources: torch.Tensor  # one vector per image-token position of ``ids``, in order
    image_index: int
    n_block: int  # how many of those positions are the image block (the rest are tap slots)


class VLM:
    """A LLaVA-style ``*ForConditionalGeneration`` model (or a PEFT wrapper of one) and its processor."""

    def __init__(self, model: Any, processor: Any, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 path: str | Path | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.path = Path(path) if path is not None else None
        self.device = device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        self._llava: Any = getattr(base, "model", None)
        if self._llava is None or not hasattr(self._llava, "vision_tower") or not hasattr(self._llava, "language_model"):
            raise DigiqError(f"{type(base).__name__} is not a LLaVA-style model (vision_tower + language_model)",
                             file=self.path)
        self._lm = self._llava.language_model
        stack = decoder_stack(self._lm)
        if stack is None:
            raise DigiqError(f"the language model {type(self._lm).__name__} has neither .layers/.norm (a Llama-style "
                             "decoder) nor .encoder.layer (a BERT run as a decoder)", file=self.path)
        pooler = getattr(self._lm, "pooler", None)
        if pooler is not None:  # a BERT's pooler: LLaVA's output has no field for it. Skip its work but keep its
            pooler.forward = _no_pooling  # weights, so that a checkpoint saved from this model loads complete
        self._decoder = Decoder(self._lm, stack)
        self._packed = PackedDecoder(self._lm) if packed_supported(self._lm) else None
        self.dtype = dtype or next(base.parameters()).dtype
        self.num_layers = self._decoder.num_layers
        self.hidden_size = self.config.text_config.hidden_size
        self.image_token = getattr(processor, "image_token", None) or P.IMAGE
        token_id = getattr(self.config, "image_token_id", None)
        self.image_token_id: int = int(token_id if token_id is not None else self.config.image_token_index)
        tok_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if tok_id != self.image_token_id:
            raise DigiqError(f"tokenizer maps {self.image_token!r} to {tok_id} but the model's image token id is "
                             f"{self.image_token_id}", file=self.path)
        self._last_vision = LastCall()
        self.strategy = self.config.vision_feature_select_strategy
        self.feature_layer = self.config.vision_feature_layer
        mean = getattr(processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
        self.pad_fill = tuple(int(round(255 * m)) for m in mean)
        self.answer_ids = self._answer_token_ids()
        self.prompt_order: P.PromptOrder = self._prompt_order()
        self.reading = P.PageReading.of_config(self.config)

    # ------------------------------------------------------------------ images
    def prepare_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pixel values for ``images``: padded to a square (with the processor's mean colour), then processed."""
        squares = [pad_to_square(img, self.pad_fill) for img in images]
        return self.processor.image_processor(images=squares, return_tensors="pt")["pixel_values"]

    def vision_features(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """The vision tower's selected features (``vision_feature_layer``/``select_strategy`` of the config),
        before the projector: ``[B, n_image_tokens, vision_hidden]``. Without gradients; a call on the pixels of
        the last call returns its result (:mod:`digiq.vlm.vision`)."""
        import torch

        pixel_values = images if isinstance(images, torch.Tensor) else self.prepare_images(images)
        return self._last_vision(pixel_values, lambda: tower_features(
            self.vision_tower, pixel_values, device=self.device, dtype=self.dtype, feature_layer=self.feature_layer,
            strategy=self.strategy))

    @property
    def vision_tower(self) -> Any:
        return self._llava.vision_tower

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The multimodal projector (differentiable: LoRA fine-tuning may train it)."""
        return self._llava.multi_modal_projector(vision_features)

    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Projected image tokens ``[B, n_image_tokens, lm_hidden]`` — compute once per screenshot and reuse
        for every candidate. Without gradients (use :meth:`vision_features` + :meth:`project` to train the
        projector)."""
        import torch

        chunks = []
        n = len(images)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                part = images[start:start + batch_size]
                chunks.append(self.project(self.vision_features(part)))
        if not chunks:
            raise DigiqError("encode_images got no images")
        return torch.cat(chunks)

    # ------------------------------------------------------------------ text + image → features
    def forward(self, image_tokens: torch.Tensor, prompts: Sequence[str],
                actions: Sequence[Action | None] | None = None, *, layers: Sequence[int] = (),
                pooling: Pooling = "last", yes_no: bool = False,
                image_sizes: Sequence[tuple[int, int]] | None = None, prefix_cache: bool = True,
                truncate: bool = True, batch_size: int = 64) -> VLMOutput:
        """Features at ``layers`` (pooled) and/or the Yes/No answer logits for a batch of prompts.

        ``image_tokens``: ``[n, d]`` or ``[1, n, d]`` (one screenshot shared by every prompt — the candidates of
        a state) or ``[B, n, d]`` (one per prompt). Each prompt contains :data:`~digiq.vlm.prompts.IMAGE`
        once and, for ``marker="patch"`` prompts, tap slots that take the patch token under the action's
        point(s); those need ``actions`` and ``image_sizes`` ((w, h) of the original screenshot(s), one or
        one per row) to map the point onto the padded square. ``prefix_cache`` computes the token prefix
        shared by all prompts once; ``truncate`` skips decoder layers above the deepest one needed (with
        ``truncate=False`` the whole model runs and hidden states are read from its output, a check).
        """
        import torch

        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})")
        layers = sorted({self._layer_index(k) for k in layers})
        if not layers and not yes_no:
            raise ValueError("ask for at least one layer or for yes_no")
        if image_tokens.dim() == 2:
            image_tokens = image_tokens.unsqueeze(0)
        n_rows = len(prompts)
        actions = list(actions) if actions is not None else [None] * n_rows
        if len(actions) != n_rows:
            raise ValueError(f"{n_rows} prompts but {len(actions)} actions")
        shared = image_tokens.shape[0] == 1
        if not shared and image_tokens.shape[0] != n_rows:
            raise ValueError(f"{image_tokens.shape[0]} images for {n_rows} prompts (expected 1 or {n_rows})")
        image_tokens = image_tokens.to(self.device)
        rows = [self._row(prompt, image_tokens, 0 if shared else i, action, image_sizes)
                for i, (prompt, action) in enumerate(zip(prompts, actions, strict=True))]
        depth = self.num_layers if (yes_no or not truncate) else max(layers)
        use_prefix = prefix_cache and shared and n_rows > 1 and truncate and depth > 0
        prefix = self._shared_prefix(rows) if use_prefix else 0
        if self._packed is not None and pooling == "last" and not yes_no and truncate and depth > 0 \
                and not torch.is_grad_enabled():
            return self._run_packed(rows, layers, depth, prefix, batch_size)
        pieces: list[VLMOutput] = []
        if prefix:
            state = self._run_prefix(rows[0], prefix, layers, depth)
            for start in range(0, n_rows, batch_size):
                pieces.append(self._run_suffixes(rows[start:start + batch_size], prefix, state, layers, depth,
                                                 pooling, yes_no))
        else:
            for start in range(0, n_rows, batch_size):
                pieces.append(self._run_full(rows[start:start + batch_size], layers, depth, pooling, yes_no,
                                             truncate))
        return VLMOutput(
            features={k: torch.cat([p.features[k] for p in pieces]) for k in layers},
            yes_no=torch.cat([p.yes_no for p in pieces if p.yes_no is not None]) if yes_no else None,
        )

    def forward_features(self, image_tokens: torch.Tensor, prompts: Sequence[str],
                         actions: Sequence[Action | None] | None = None, layer: int = -1,
                         pooling: Pooling = "last", **kwargs: Any) -> torch.Tensor:
        """Pooled hidden states at ``layer`` (``hidden_states`` numbering), float32 ``[B, hidden]``; runs only
        the first ``layer`` decoder layers. See :meth:`forward` for the arguments."""
        return self.forward(image_tokens, prompts, actions, layers=[layer], pooling=pooling, **kwargs).features[
            self._layer_index(layer)]

    def yes_no_logits(self, image_tokens: torch.Tensor, prompts: Sequence[str],
                      actions: Sequence[Action | None] | None = None, **kwargs: Any) -> torch.Tensor:
        """Logits of the answer tokens "Yes" and "No" after each prompt, float32 ``[B, 2]``."""
        logits = self.forward(image_tokens, prompts, actions, yes_no=True, **kwargs).yes_no
        assert logits is not None
        return logits

    # ------------------------------------------------------------------ convenience for one state
    def candidate_features(self, image: Image.Image, goal: str, observation: str, actions: Sequence[Action],
                           targets: Sequence[str | None] | None = None, *, layers: Sequence[int] = (-1,),
                           pooling: Pooling = "last", marker: P.Marker = "patch", yes_no: bool = False,
                           image_tokens: torch.Tensor | None = None, **kwargs: Any) -> VLMOutput:
        """f(s, a) for the candidates of one state. ``marker``: "patch" (tap slot, screenshot encoded once —
        pass ``image_tokens`` to reuse an encoding), "none" (text only) or "draw" (marker drawn on the
        screenshot and the screenshot re-encoded per candidate: slow, the official way)."""
        prompts = P.build_prompts(goal, observation, actions, targets, marker=marker, order=self.prompt_order)
        if marker == "draw":
            tokens = self.encode_images([draw_tap_marker(image, a) for a in actions])
            return self.forward(tokens, prompts, actions, layers=layers, pooling=pooling, yes_no=yes_no, **kwargs)
        tokens = image_tokens if image_tokens is not None else self.encode_images([image])
        return self.forward(tokens, prompts, actions, layers=layers, pooling=pooling, yes_no=yes_no,
                            image_sizes=[image.size], **kwargs)

    def state_features(self, images: Sequence[Image.Image], goals: Sequence[str], observations: Sequence[str], *,
                       layers: Sequence[int] = (-1,), pooling: Pooling = "last",
                       image_tokens: torch.Tensor | None = None, **kwargs: Any) -> VLMOutput:
        """f(s) for a batch of states (one screenshot each), from :func:`~digiq.vlm.prompts.state_prompt`."""
        prompts = [P.state_prompt(g, o, self.prompt_order) for g, o in zip(goals, observations, strict=True)]
        tokens = image_tokens if image_tokens is not None else self.encode_images(images)
        return self.forward(tokens, prompts, layers=layers, pooling=pooling, **kwargs)

    def full_forward(self, images: Sequence[Image.Image], prompts: Sequence[str], **kwargs: Any) -> Any:
        """The reference path: ``model(**processor(images, text))`` on square-padded screenshots (prompts
        without tap slots), with ``output_hidden_states=True``. Slow — for checks and viewers."""
        texts = [p.replace(P.IMAGE, self.image_token) for p in prompts]
        squares = [pad_to_square(img, self.pad_fill) for img in images]
        inputs = self.processor(images=squares, text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return self.model(**inputs, output_hidden_states=True, **kwargs)

    # ------------------------------------------------------------------ internals
    def _layer_index(self, k: int) -> int:
        idx = k if k >= 0 else self.num_layers + 1 + k
        if not 0 <= idx <= self.num_layers:
            raise ValueError(f"layer {k} is outside 0..{self.num_layers} (or -1..-{self.num_layers + 1})")
        return idx

    def _prompt_order(self) -> P.PromptOrder:
        return P.checked_order(getattr(self.config, P.ORDER_KEY, P.UNRECORDED_ORDER),
                               file=self.path / "config.json" if self.path else None)

    def _answer_token_ids(self) -> tuple[int, int]:
        """Token ids of the first token of " Yes"/" No" right after "ASSISTANT:" (tokenizer-independent)."""
        head = "USER: Is it? ASSISTANT:"
        base = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        out = []
        for answer in P.ANSWERS:
            ids = self.tokenizer(f"{head} {answer}", add_special_tokens=False)["input_ids"]
            if ids[:len(base)] != base or len(ids) <= len(base):
                raise DigiqError(f"cannot find the answer token for {answer!r} in this tokenizer", file=self.path)
            out.append(ids[len(base)])
        if out[0] == out[1]:
            raise DigiqError("the answers Yes and No start with the same token", file=self.path)
        return out[0], out[1]

    def _row(self, prompt: str, image_tokens: torch.Tensor, image_index: int, action: Action | None,
             image_sizes: Sequence[tuple[int, int]] | None) -> _Row:
        import torch

        if prompt.count(P.IMAGE) != 1:
            raise DigiqError(f"a prompt must contain {P.IMAGE} exactly once: {prompt[:80]!r}…", field="prompt")
        before, after = prompt.split(P.IMAGE, 1)
        if P.TAP_SLOT in before:
            raise DigiqError(f"tap slot {P.TAP_SLOT} before the image in prompt {prompt[:80]!r}…", field="prompt")
        tokens = image_tokens[image_index]
        n_image = tokens.shape[0]
        n_slots = after.count(P.TAP_SLOT)
        text = before + self.image_token * n_image + after.replace(P.TAP_SLOT, self.image_token)
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if sum(1 for t in ids if t == self.image_token_id) != n_image + n_slots:
            raise DigiqError(f"the image token {self.image_token!r} appears in the prompt text itself", field="prompt")
        if not n_slots:
            return _Row(ids, tokens, image_index, n_image)
        points = action_points(action) if action is not None else []
        if len(points) < n_slots:
            raise DigiqError(f"prompt has {n_slots} tap slot(s) but the action "
                             f"{'(none)' if action is None else action.kind} gives {len(points)} point(s)",
                             field="prompt")
        if image_sizes is None:
            raise DigiqError("tap slots need image_sizes (the original screenshot's (w, h)) to place the point",
                             field="image_sizes")
        size = image_sizes[0] if len(image_sizes) == 1 else image_sizes[image_index]
        grid, offset = patch_grid(n_image, self.strategy)
        patches = [offset + patch_index(square_point(pt, size), grid) for pt in points[:n_slots]]
        sources = torch.cat([tokens, tokens[patches]])
        return _Row(ids, sources, image_index, n_image)

    def _shared_prefix(self, rows: list[_Row]) -> int:
        """Length of the token prefix all rows share, cut before any tap slot and leaving each row ≥ 1 token."""
        first = rows[0].ids
        n = min(len(r.ids) for r in rows) - 1
        for r in rows[1:]:
            ids = r.ids
            i = 0
            while i < n and ids[i] == first[i]:
                i += 1
            n = i
        # stop before the first tap slot: the (n_block + 1)-th image-token position of any row
        for r in rows:
            seen = 0
            for i, t in enumerate(r.ids[:n]):
                if t == self.image_token_id:
                    seen += 1
                    if seen > r.n_block:
                        n = min(n, i)
                        break
        return n if n >= MIN_PREFIX_TOKENS else 0

    def _embed(self, ids: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings of ``ids`` [B, T] with image-token positions replaced, row by row, by ``sources``."""
        import torch

        embeds = self._lm.get_input_embeddings()(ids)
        mask = ids.eq(self.image_token_id)
        if mask.any():
            src = torch.cat(sources).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), src)
        return embeds

    def _run_full(self, rows: list[_Row], layers: list[int], depth: int, pooling: str, yes_no: bool,
                  truncate: bool) -> VLMOutput:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        embeds = self._embed(ids, [r.sources for r in rows])
        hidden, final = self._decoder.run(embeds, mask, position_ids, layers, depth, yes_no, truncate)
        out = VLMOutput()
        for k in layers:
            h = hidden[k]
            out.features[k] = (h[:, -1] if pooling == "last" else _masked_mean(h, mask)).float()
        if yes_no and final is not None:
            out.yes_no = self._answer_logits(final[:, -1])
        return out

    def _run_packed(self, rows: list[_Row], layers: list[int], depth: int, prefix: int, batch_size: int) -> VLMOutput:
        import torch

        state, n_src, packed = None, 0, self._packed
        assert packed is not None
        if prefix:
            ids = torch.tensor(rows[0].ids[:prefix], device=self.device)
            n_src = int(ids.eq(self.image_token_id).sum())
            state = packed.prefix(self._embed(ids[None], [rows[0].sources[:n_src]])[0], depth)
        parts = []
        for chunk in (rows[i:i + batch_size] for i in range(0, len(rows), batch_size)):
            ids = torch.tensor([t for r in chunk for t in r.ids[prefix:]], device=self.device)
            embeds = self._embed(ids[None], [r.sources[n_src:] for r in chunk])[0]
            parts.append(packed.last_token(embeds, [len(r.ids) - prefix for r in chunk], layers, depth, state))
        return VLMOutput(features={k: torch.cat([p[k] for p in parts]).float() for k in layers})

    def _run_prefix(self, row: _Row, prefix: int, layers: list[int], depth: int) -> dict[str, Any]:
        import torch

        ids = torch.tensor([row.ids[:prefix]], device=self.device)
        n_src = int(ids.eq(self.image_token_id).sum())
        embeds = self._embed(ids, [row.sources[:n_src]])
        cache = self._decoder.new_cache()
        mask = torch.ones_like(ids)
        hidden, _ = self._decoder.run(embeds, mask, None, layers, depth, False, True, cache=cache)
        return {"cache": cache, "n_src": n_src,
                "sums": {k: hidden[k][0].sum(0) for k in layers}}

    def _run_suffixes(self, rows: list[_Row], prefix: int, state: dict[str, Any], layers: list[int], depth: int,
                      pooling: str, yes_no: bool) -> VLMOutput:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = [len(r.ids) - prefix for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        suffix_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: positions continue the prefix exactly
            ids[i, :lengths[i]] = torch.tensor(r.ids[prefix:])
            suffix_mask[i, :lengths[i]] = 1
        ids, suffix_mask = ids.to(self.device), suffix_mask.to(self.device)
        mask = torch.cat([torch.ones((len(rows), prefix), dtype=torch.long, device=self.device), suffix_mask], 1)
        position_ids = (prefix + torch.arange(width, device=self.device)).unsqueeze(0).expand(len(rows), -1)
        embeds = self._embed(ids, [r.sources[state["n_src"]:] for r in rows])
        cache = expand_cache(state["cache"], len(rows), self._decoder.new_cache())
        hidden, final = self._decoder.run(embeds, mask, position_ids, layers, depth, yes_no, True, cache=cache)
        last = torch.tensor(lengths, device=self.device) - 1
        rows_idx = torch.arange(len(rows), device=self.device)
        out = VLMOutput()
        for k in layers:
            h = hidden[k]
            if pooling == "last":
                out.features[k] = h[rows_idx, last].float()
            else:
                total = state["sums"][k].unsqueeze(0) + (h * suffix_mask.unsqueeze(-1).to(h.dtype)).sum(1)
                out.features[k] = (total.float() / (prefix + torch.tensor(lengths, device=self.device)).unsqueeze(-1))
        if yes_no and final is not None:
            out.yes_no = self._answer_logits(final[rows_idx, last])
        return out

    def _answer_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        weight = head.weight[list(self.answer_ids)]
        logits = last_hidden @ weight.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[list(self.answer_ids)]
        return logits.float()


def _no_pooling(*_args: Any, **_kwargs: Any) -> None:
    return None


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
