"""The language model run for last-token features only: packed rows, and the read layer's last token alone.

f(s) and f(s, a) with ``pooling="last"`` read one vector per row, the last token's hidden state at layer ``k``
(``hidden_states`` numbering, :mod:`digiq.vlm.model`). Of a Llama-style decoder's work only this reaches it:

- layers ``1..k-1`` for every real token of the row (their keys and values feed layer ``k``'s attention);
- at layer ``k``: the keys and values of every token, but the query, attention output, ``o_proj`` and MLP of the
  last token alone (no other position's output at layer ``k`` is read);
- nothing above layer ``k`` and no LM head; the final norm only when ``k`` is the last layer.

Rows are **packed**: the per-token work (norms, projections, MLP) runs on the ``N = Σ_i L_i`` real tokens, never on
padding; only attention, which is small here, is laid out per row (padded, masked). A token prefix shared by all
rows (the state, :meth:`digiq.vlm.model.VLM.forward`) enters as keys/values computed once; positions continue it.

For row i with real tokens ``x_{i,1..L_i}`` after a prefix of length P, each layer computes (Llama)::

    h = RMSNorm₁(x);  q, k, v = W_q h, W_k h, W_v h (RoPE on q, k at position P + t)
    a_t = softmax(q_t · [k_prefix; k_{i,1..t}]ᵀ · d_h^(-1/2)) [v_prefix; v_{i,1..t}]
    x' = x + W_o a;   x'' = x' + MLP(RMSNorm₂(x'))

which is the Hugging Face layer's math; the module's own submodules (norms, projections, MLP, rotary embedding)
compute each piece, so a dynamically quantized model (:func:`digiq.vlm.load.quantize_language_model`) runs here
unchanged. Results equal the full model's hidden states up to float rounding (tests/test_packed_decoder.py).
Supported: Llama-style decoders (``model_type`` llama); anything else uses the Hugging Face path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PACKED_MODEL_TYPES = ("llama",)


@dataclass
class PrefixKV:
    """Keys and values of a shared token prefix, one ``(k, v)`` of ``[n_kv_heads, P, head_dim]`` per layer."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int


def packed_supported(lm: Any) -> bool:
    """True for a Llama-style decoder whose layers this module can run (see the module docstring)."""
    layers = getattr(lm, "layers", None)
    if getattr(getattr(lm, "config", None), "model_type", None) not in PACKED_MODEL_TYPES or not layers:
        return False
    if not hasattr(lm, "rotary_emb") or not hasattr(lm, "norm"):
        return False
    attn = getattr(layers[0], "self_attn", None)
    return (attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling"))
            and not hasattr(attn, "q_norm") and not hasattr(attn, "k_norm")
            and all(hasattr(layers[0], n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")))


class PackedDecoder:
    """Runs the first ``depth`` layers of a Llama-style language model ``lm`` on packed rows (module docstring)."""

    def __init__(self, lm: Any):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.lm, self.rope = lm, apply_rotary_pos_emb
        config = lm.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.num_layers = len(lm.layers)

    def prefix(self, embeds: torch.Tensor, depth: int) -> PrefixKV:
        """Keys/values of layers ``1..depth`` for one row ``embeds`` [P, d] (its own outputs are never read)."""
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._run(embeds, [embeds.shape[0]], None, depth, [], kv_out=kv)
        return PrefixKV(kv, embeds.shape[0])

    def last_token(self, embeds: torch.Tensor, lengths: Sequence[int], layers: Sequence[int], depth: int,
                   prefix: PrefixKV | None = None) -> dict[int, torch.Tensor]:
        """``{k: [B, d]}``: the last token's hidden state at each of ``layers`` (all ≤ ``depth``) for the packed rows
        ``embeds`` [N, d] of ``lengths`` (Σ = N), after ``prefix`` when given."""
        return self._run(embeds, list(lengths), prefix, depth, list(layers))

    # ------------------------------------------------------------------ one pass
    def _run(self, x: torch.Tensor, lengths: list[int], prefix: PrefixKV | None, depth: int, layers: list[int],
             kv_out: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[int, torch.Tensor]:
        import torch

        start = prefix.length if prefix is not None else 0
        plan = _Layout(lengths, x.device)
        positions = start + plan.column
        cos, sin = self.lm.rotary_emb(x.unsqueeze(0), positions.unsqueeze(0))
        rope = (cos[0], sin[0])
        out: dict[int, torch.Tensor] = {0: x[plan.last]} if 0 in layers else {}
        for i in range(depth):
            layer = self.lm.layers[i]
            final = i == depth - 1
            past = prefix.kv[i] if prefix is not None else None
            if final and kv_out is not None and not layers:  # a prefix: the read layer's keys/values are all it gives
                h = layer.input_layernorm(x)
                k, v = self._keys_values(layer.self_attn, h, rope)
                kv_out.append((k.transpose(0, 1), v.transpose(0, 1)))
                break
            last_only = final and kv_out is None
            x = self._layer(layer, x, plan, rope, past, last_only, kv_out)
            if i + 1 in layers:
                out[i + 1] = x if last_only else x[plan.last]
        if depth == self.num_layers and depth in out:
            out[depth] = self.lm.norm(out[depth])
        return out

    def _keys_values(self, attn: Any, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[
            torch.Tensor, torch.Tensor]:
        """RoPE'd keys and values ``[N, n_kv_heads, head_dim]`` of the normed tokens ``h`` [N, d]."""
        n = h.shape[0]
        k = attn.k_proj(h).view(n, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(n, self.kv_heads, self.head_dim)
        cos, sin = rope
        _, k = self.rope(k, k, cos, sin, unsqueeze_dim=1)
        return k, v

    def _layer(self, layer: Any, x: torch.Tensor, plan: _Layout, rope: tuple[torch.Tensor, torch.Tensor],
               past: tuple[torch.Tensor, torch.Tensor] | None, last_only: bool,
               kv_out: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        """One decoder layer on the packed tokens ``x`` [N, d]; ``last_only``: the output of each row's last token
        alone [B, d] (keys and values still come from every token)."""
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        k, v = self._keys_values(attn, h, rope)
        if kv_out is not None:
            kv_out.append((k.transpose(0, 1), v.transpose(0, 1)))
        rows = plan.last if last_only else slice(None)
        hq, cos, sin = h[rows], rope[0][rows], rope[1][rows]
        q = attn.q_proj(hq).view(hq.shape[0], self.heads, self.head_dim)
        q, _ = self.rope(q, q, cos, sin, unsqueeze_dim=1)
        a = self._attend(attn, q, k, v, plan, past, last_only)
        x = x[rows] + attn.o_proj(a)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _attend(self, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Layout,
                past: tuple[torch.Tensor, torch.Tensor] | None, last_only: bool) -> torch.Tensor:
        """Causal attention of each row's queries over the prefix and the row's own keys; packed output [n_q, H·d_h]."""
        import torch

        kp, vp = plan.pad(k), plan.pad(v)  # [B, T, Hkv, hd]
        kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)  # [B, Hkv, T, hd]
        n_past = 0
        if past is not None:
            pk, pv = past
            n_past = pk.shape[1]
            b = kp.shape[0]
            kp = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), kp], 2)
            vp = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), vp], 2)
        if last_only:
            qp = q.unsqueeze(2)  # [B, H, 1, hd]
            query_col = plan.lengths.sub(1).view(-1, 1, 1, 1)
        else:
            qp = plan.pad(q).transpose(1, 2)  # [B, H, T, hd]
            query_col = torch.arange(plan.width, device=q.device).view(1, 1, -1, 1)
        key_col = torch.arange(n_past + plan.width, device=q.device).view(1, 1, 1, -1) - n_past
        mask = (key_col <= query_col) & (key_col < plan.lengths.view(-1, 1, 1, 1))
        if self.kv_heads != self.heads:
            kp = kp.repeat_interleave(self.heads // self.kv_heads, dim=1)
            vp = vp.repeat_interleave(self.heads // self.kv_heads, dim=1)
        a = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=attn.scaling)
        a = a.transpose(1, 2)  # [B, Tq, H, hd]
        a = a[:, 0] if last_only else a[plan.row, plan.column]
        return a.reshape(a.shape[0], self.heads * self.head_dim)


class _Layout:
    """Where each packed token sits in a padded ``[B, T]`` layout: its row and column; each row's last token."""

    def __init__(self, lengths: list[int], device: Any):
        import torch

        self.lengths = torch.tensor(lengths, device=device)
        self.width = max(lengths)
        self.row = torch.repeat_interleave(torch.arange(len(lengths), device=device), self.lengths)
        starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.column = torch.arange(int(self.lengths.sum()), device=device) - starts[self.row]
        self.last = starts + self.lengths - 1

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """Packed ``[N, …]`` → padded ``[B, T, …]`` (zeros where a row has no token)."""
        out = t.new_zeros((len(self.lengths), self.width, *t.shape[1:]))
        out[self.row, self.column] = t
        return out
