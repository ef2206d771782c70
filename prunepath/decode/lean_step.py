"""A hand-written forward for Llama-family models, with its own static KV cache.

Hugging Face's forward is general (any cache, any attention backend, mask building, output
records); a decode step needs a fraction of it. :class:`LeanStep` runs the same model -- its
own modules and weights, nothing copied -- as a few plain tensor ops per layer, in the way
gpt-fast writes a decode step:

    h = embed(ids)
    per layer:  x = input_norm(h)
                q, k, v = q_proj(x), k_proj(x), v_proj(x)     (+ q_norm/k_norm: Qwen3; one
                                                                product when fused_qkv.fuse)
                q, k = rotary(q, k) from one table of every position, made once
                cache[slot] = k, v                             (index_copy_ at device slots)
                h += o_proj(softmax(q k^T * scale + mask) v)   (one token: a grouped matmul;
                                                                prompts: SDPA, no [T, L] scores)
                h += mlp(post_norm(h))                         (the routed FFN or the dense MLP;
                                                                one up product when stacked_ffn.stack)
    logits = lm_head(norm(h[:, -1]))

Every length is static (the cache holds ``max_length`` slots and attention reads all of
them under a mask), and the slot counter is a device tensor, so a step captures as a CUDA
graph or compiles with ``torch.compile(mode="reduce-overhead")`` and replays. Used by
:class:`prunepath.decode.Decoder` with ``step="lean"`` (and ``"auto"``, its default, wherever
:func:`unsupported` finds nothing): ``config.model_type`` in :data:`FAMILIES`, full (not
sliding-window) attention over the cache, rotary frequencies that do not depend on the length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from . import fast_linear
from .fused_qkv import qkv_view
from .stacked_ffn import gate_up_view

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(model, max_length: int) -> str | None:
    """Why :class:`LeanStep` cannot run ``model`` over ``max_length`` tokens (None: it can)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"step='lean' supports model_type in {FAMILIES}, got {kind!r}"
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if (uses_window and window is not None and window < max_length) or kinds != {"full_attention"}:
        return (f"step='lean' needs full attention over max_length={max_length} tokens; this "
                f"{kind} model uses a sliding window of {window}")
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1 or any(hasattr(m, "_hf_hook") for m in model.modules()):
        return ("step='lean' needs the whole model on one device without accelerate's offload "
                f"hooks, got parameters on {sorted(map(str, devices))}")
    rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope is None or "dynamic" in rope:  # dynamic rope rescales with the length seen so far
        return f"step='lean' needs a rotary embedding with fixed frequencies, got {rope!r}"
    return None


def _plain_gated_mlp(mlp) -> bool:
    """The MLP of a :data:`FAMILIES` model (``down(act_fn(gate(x)) * up(x))``), not wrapped."""
    return (all(isinstance(getattr(mlp, n, None), torch.nn.Linear)
                for n in ("gate_proj", "up_proj", "down_proj"))
            and callable(getattr(mlp, "act_fn", None)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanStep:
    """Forward of a Llama-family causal LM over a static KV cache of ``batch_size`` rows and
    ``max_length`` slots. Call it with the next tokens ``[B, T]`` and their position ids
    (``[B, T]``; per row, so left-padded rows have their own positions); the tokens take the
    next ``T`` cache slots. Returns the last position's logits ``[B, vocab]``."""

    def __init__(self, model, batch_size: int, max_length: int):
        why = unsupported(model, max_length)
        if why:
            raise ValueError(why + " (use step='hf')")
        base = model.model
        cfg = model.config
        p = next(model.parameters())
        dev, dt = p.device, p.dtype
        self.model, self.base = model, base
        self.layers = list(base.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.scale = attn.scaling
        self.batch_size, self.max_length = batch_size, max_length
        shape = (batch_size, self.kv_heads, max_length, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in self.layers]
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # next free cache slot
        self._slots = torch.arange(max_length, device=dev)
        # the model's own rotary module for every position at once (any rope scaling it has)
        pos = self._slots.unsqueeze(0)
        with torch.no_grad():
            cos, sin = base.rotary_emb(torch.empty(0, device=dev, dtype=dt), pos)
        self.cos, self.sin = cos[0], sin[0]  # [max_length, head_dim]
        # per layer: (weight [Dq + 2 Dkv, d], bias) where q/k/v are fused (fused_qkv.fuse)
        self.qkv = [qkv_view(layer.self_attn) for layer in self.layers]
        # per layer: a dense MLP's [W_gate; W_up] [2F, d] where stacked (stacked_ffn.stack;
        # a routed layer does its own)
        self.gate_up = [gate_up_view(layer.mlp) if _plain_gated_mlp(layer.mlp) else None
                        for layer in self.layers]

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors a step reads or writes besides the model's own (the caches, the
        slot counter, the rotary table): ``torch.compile(mode="reduce-overhead")`` must see
        them as static addresses (``torch._dynamo.mark_static_address``), or its CUDA graphs
        would copy them in per replay, or, as the caches are written, not be used at all."""
        fused = [t for wb in self.qkv if wb is not None for t in wb if t is not None]
        fused += [t for t in self.gate_up if t is not None]
        return [self.slot, self._slots, self.cos, self.sin, *self.k_cache, *self.v_cache, *fused]

    def reset(self) -> None:
        """Empty the cache (a new batch of prompts); stale slots are masked, not cleared."""
        self.slot.zero_()

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask``: ``[B, max_length]``, nonzero where a slot holds a real token (left
        padding is zero), or None when no row is padded."""
        t = input_ids.shape[1]
        slots = self.slot + self._slots[:t]  # the slots these tokens take
        # query i sees slots <= its own; [B or 1, 1, T, L]
        allowed = self._slots.unsqueeze(0) <= slots.unsqueeze(1)
        if key_mask is not None:  # and no padding slot, except its own (a padding query
            # would otherwise see nothing: a NaN row, unused but summed into statistics)
            own = self._slots.unsqueeze(0) == slots.unsqueeze(1)
            allowed = allowed & ((key_mask != 0).unsqueeze(1) | own)
        allowed = allowed.view(-1, 1, t, self.max_length)
        cos = self.cos[position_ids].unsqueeze(1)  # [B, 1, T, hd]
        sin = self.sin[position_ids].unsqueeze(1)
        h = self.base.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), i, slots,
                                    cos, sin, allowed)
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h), i)
        self.slot += t
        return self.model.lm_head(self.base.norm(h[:, -1]))

    def _mlp(self, mlp, x, i):
        joint = self.gate_up[i]
        if joint is None:
            return mlp(x)
        g, u = F.linear(x, joint).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(g) * u)

    def _attention(self, attn, x, i, slots, cos, sin, allowed):
        b, t, _ = x.shape
        hd, kv, g = self.head_dim, self.kv_heads, self.heads // self.kv_heads
        if self.qkv[i] is not None:  # one product for q, k and v
            w, bias = self.qkv[i]
            # the CPU decode GEMV where the model's linears use it (prunepath.decode.fast_linear)
            linear = ops.linear if fast_linear.is_fast(attn.q_proj) else F.linear
            y = linear(x.reshape(b * t, -1), w, bias).view(b, t, -1)
            q, k, v = y.split([self.heads * hd, kv * hd, kv * hd], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = q.view(b, t, self.heads, hd), k.view(b, t, kv, hd), v.view(b, t, kv, hd)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head before the rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kc, vc = self.k_cache[i], self.v_cache[i]
        kc.index_copy_(2, slots, k)
        vc.index_copy_(2, slots, v)
        if t > 1:  # a prompt: SDPA (no [B, heads, T, L] score tensor in memory)
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=allowed, scale=self.scale,
                                                 enable_gqa=True)
        else:  # one token: the g query heads of a kv head attend together
            q = q.reshape(b, kv, g, hd)
            # compiled for a CPU: as products and sums, which inductor fuses into two loops (the
            # tiny batched matmuls cost ~28 us each there: 1.7 ms of a SmolLM2 step); else matmuls
            fused = q.device.type == "cpu" and torch.compiler.is_compiling()
            if fused:
                scores = (q.unsqueeze(3) * kc.unsqueeze(2)).sum(-1, dtype=torch.float32)
            else:
                scores = (q @ kc.transpose(-1, -2)).float()
            scores = (scores * self.scale).masked_fill(~allowed, float("-inf"))  # [B, kv, g, L]
            probs = torch.softmax(scores, dim=-1).to(vc.dtype)
            if fused:
                out = (probs.unsqueeze(-1) * vc.unsqueeze(2)).sum(3)
            else:
                out = probs @ vc
            out = out.view(b, self.heads, 1, hd)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


__all__ = ["FAMILIES", "LeanStep", "unsupported"]
