"""A decode step for Llama-family models in plain torch ops, on the model's own weights.

A decode step of a small model on a CPU is mostly overhead. transformers runs each layer
through a dozen modules with keyword plumbing, deprecation wrappers, hub-kernel hooks and
mask building: SmolLM2-135M's 30 layers make about 1,500 torch calls a step, and a lone
story's step took ~20 ms where its int4 weights and cache take ~7 ms to read. This module
does the same arithmetic for one new token per row in about half the calls: the model's own
linear layers (with their int4/int8 copies, storygen/int8.py), one rms_norm call per norm,
the rotary embedding computed once per step, the KV cache appended in place (kvcache.py),
and attention through storygen/attention.py (our C kernel where it is built).

It serves decode steps only, for models whose layers are exactly transformers' Llama layers
(checked at load, `supports`); prefill, other architectures and `generate()` stay with
transformers. tests/test_decoder.py checks it against transformers' forward, token by token.
STORYGEN_LEAN_DECODE: auto (on where supported), false.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from storygen.kernels import DecodeAttention

logger = logging.getLogger(__name__)

LLAMA_LIKE = ("LlamaForCausalLM",)  # architectures whose decoder layers are exactly Llama's


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's parts, looked up once."""

    norm_in: torch.Tensor  # (hidden,) input RMSNorm weight
    norm_post: torch.Tensor  # (hidden,) post-attention RMSNorm weight
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module


def supports(model: nn.Module) -> bool:
    """Whether `model` is a Llama-family causal LM this decoder reproduces exactly."""
    config = model.config
    if type(model).__name__ not in LLAMA_LIKE or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if config.hidden_act != "silu" or getattr(config, "attention_dropout", 0.0):
        return False
    inner = getattr(model, "model", None)
    return inner is not None and all(
        type(layer).__name__ == "LlamaDecoderLayer" and type(layer.self_attn).__name__ == "LlamaAttention"
        and type(layer.mlp).__name__ == "LlamaMLP" for layer in inner.layers)


@dataclass(frozen=True)
class _Parts:
    """The model-wide parts (kept out of nn.Module's registry: they belong to the model)."""

    embed: nn.Module
    rotary: nn.Module
    lm_head: nn.Module
    norm: torch.Tensor  # (hidden,) the final RMSNorm weight
    layers: tuple[_Layer, ...]


@dataclass
class DecodeOutput:
    logits: torch.Tensor  # (B, 1, V) in the model's dtype, as transformers' output has them


class LeanDecoder(nn.Module):
    """One decode step: the next token of every row in, their logits out.

    Called with the keyword arguments a transformers forward takes, so forward hooks written for
    the model (tests/model_hooks.py) see the same `input_ids` and `.logits` here.
    """

    def __init__(self, model: nn.Module, kernel: DecodeAttention | None = None) -> None:
        super().__init__()
        inner, config = model.model, model.config
        self.parts = _Parts(inner.embed_tokens, inner.rotary_emb, model.lm_head, inner.norm.weight, tuple(
            _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj) for layer in inner.layers))
        self.eps = float(inner.norm.variance_epsilon)
        self.layer_eps = [(float(layer.input_layernorm.variance_epsilon),
                           float(layer.post_attention_layernorm.variance_epsilon)) for layer in inner.layers]
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = float(inner.layers[0].self_attn.scaling)
        self.kernel = kernel

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
                attention_mask: torch.Tensor | None = None) -> DecodeOutput:
        """input_ids, position_ids: (B, 1) long; cache: the batch's KV, which grows by this position;
        attention_mask: (B, T+1), nonzero where a row attends (None: everywhere)."""
        parts = self.parts
        B = input_ids.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        mask = attention_mask.bool() if attention_mask is not None else None  # (B, T+1)
        sdpa_mask = mask[:, None, None, :] if mask is not None else None  # (B, 1, 1, T+1)
        x = parts.embed(input_ids[:, 0])  # (B, hidden)
        # 1. The rotary angles of every row's position, once for all layers: (B, 1, D).
        cos, sin = parts.rotary(x, position_ids)
        half = D // 2
        for layer, (eps_in, eps_post), cache_layer in zip(parts.layers, self.layer_eps, cache.layers):
            # 2. Attention: project, rotate (rotate_half, as transformers), append to the cache, attend.
            h = _rms_norm(x, layer.norm_in, eps_in)
            q = layer.q(h).view(B, H, D)
            k = layer.k(h).view(B, KV, D)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            keys, values = cache_layer.update(k.view(B, KV, 1, D), layer.v(h).view(B, KV, 1, D))  # (B, KV, T+1, D)
            x = x + layer.o(self._attend(q.view(B, KV, H // KV, D), keys, values, mask, sdpa_mask).view(B, H * D))
            # 3. The MLP: down(silu(gate(h)) * up(h)).
            h = _rms_norm(x, layer.norm_post, eps_post)
            x = x + layer.down(nn.functional.silu(layer.gate(h)) * layer.up(h))
        return DecodeOutput(parts.lm_head(_rms_norm(x, parts.norm, self.eps))[:, None, :])  # (B, 1, V)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                sdpa_mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, KV, G, D): each key/value head's query heads; keys, values (B, KV, T, D). Returns (B, KV, G, D)."""
        if self.kernel is not None and self.kernel.fits(q, keys, values, mask):
            return self.kernel(q, keys, values, mask, self.scaling)
        return nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=sdpa_mask, scale=self.scaling)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: normalise in fp32, back to x's dtype, then scale."""
    return weight * nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
