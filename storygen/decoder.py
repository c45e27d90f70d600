"""A forward pass for Llama-family models in plain torch ops, on the model's own weights.

A decode step of a small model on a CPU is mostly overhead. transformers runs each layer
through a dozen modules with keyword plumbing, deprecation wrappers, hub-kernel hooks and
mask building: SmolLM2-135M's 30 layers make about 1,500 torch calls a step, and a lone
story's step took ~20 ms where its int4 weights and cache take ~7 ms to read. This module
does the same arithmetic in a fraction of the calls: the model's own linear layers (with
their int4/int8 copies, storygen/int8.py), q/k/v and gate/up each fused into one layer
(their weights shared, not copied), the rotary angles computed once per pass, the KV cache
appended in place (kvcache.py), and attention through our C kernel for a decode step
(storygen/kernels.py) or SDPA. In bf16 on a CPU, the norms, the rotary embedding and the
MLP's silu(gate) * up are our C kernels too (kernels.LayerOps): one call each, where torch
takes two to seven operators.

It serves the engine's prefills (S new tokens a row, after any cached prefix, left-padded)
and decode steps (one token a row), with the logits of each row's last position only, for
models whose layers are exactly transformers' Llama layers (checked at load, `supports`);
other architectures and `generate()` stay with transformers. tests/test_decoder.py checks
it against transformers' forward. STORYGEN_LEAN_DECODE: auto (on a CPU, where supported),
true (any device), false. It is plain torch and should serve a GPU too, but no GPU has run
it yet, so auto leaves GPUs to transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from storygen.int8 import DualLinear, Int4Linear, SmallBatchLinear, join
from storygen.kernels import (MAX_GROUP, MAX_HEAD_DIM, DecodeAttention, DecodeLayers, LayerOps, StackLayer,
                              StackLinear)
from storygen.kvcache import AppendLayer

logger = logging.getLogger(__name__)

LLAMA_LIKE = ("LlamaForCausalLM",)  # architectures whose decoder layers are exactly Llama's
STACK_ROWS = 16  # rows up to which a decode step's layers are one C call (kernels.DecodeLayers): the matmuls' limit


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's parts, looked up once."""

    norm_in: torch.Tensor  # (hidden,) input RMSNorm weight
    norm_post: torch.Tensor  # (hidden,) post-attention RMSNorm weight
    qkv: nn.Module  # q, k and v in one linear layer: (B, hidden) -> (B, (H + 2 KV) D)
    o: nn.Module
    gate_up: nn.Module  # gate and up in one: (B, hidden) -> (B, 2 I)
    down: nn.Module


def fuse(parts: list[nn.Module]) -> nn.Module:
    """One linear layer that computes `parts` side by side (their outputs concatenated).

    The parts' dense weights become views of the fused one, so no weight is held twice; a
    fused layer gets the same kind of small-batch copy its parts had, their copies joined
    (int8.join), which is exact: both are per output row. Parts of mixed kinds, with biases or packed for oneDNN
    (fp32 on a CPU, onednn.py) are called one by one instead.
    """
    kinds = {type(part) for part in parts}
    denses = [part.dense if isinstance(part, SmallBatchLinear) else part for part in parts]
    plain = all(type(dense) is nn.Linear and dense.bias is None for dense in denses)  # not oneDNN-packed (onednn.py)
    if len(kinds) != 1 or not plain:
        return _Concat(parts)
    weight = torch.cat([dense.weight.detach() for dense in denses])  # (sum of outs, in)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    start = 0
    for dense in denses:
        rows = dense.weight.shape[0]
        dense.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        start += rows
    return join(fused, parts) if issubclass(kinds.pop(), SmallBatchLinear) else fused


class _Concat(nn.Module):
    """Parts that can't be fused, called one by one."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


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


def can_use(model: nn.Module, device: torch.device, mode: str = "auto") -> bool:
    """Whether STORYGEN_LEAN_DECODE=`mode` puts `model`'s decode steps here."""
    return mode != "false" and supports(model) and (mode == "true" or device.type == "cpu")


class LeanDecoder(nn.Module):
    """A prefill or a decode step: new tokens of every row in, the logits of each row's last one out.

    Called with the keyword arguments a transformers forward takes, so forward hooks written for
    the model (tests/model_hooks.py) see the same `input_ids` and `.logits` here.
    """

    def __init__(self, model: nn.Module, kernel: DecodeAttention | None = None, ops: LayerOps | None = None,
                 stack: DecodeLayers | None = None) -> None:
        super().__init__()
        inner, config = model.model, model.config
        with torch.no_grad():
            layers = tuple(_Layer(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]), layer.self_attn.o_proj,
                fuse([layer.mlp.gate_proj, layer.mlp.up_proj]), layer.mlp.down_proj) for layer in inner.layers)
        self.parts = _Parts(inner.embed_tokens, inner.rotary_emb, model.lm_head, inner.norm.weight, layers)
        self.eps = float(inner.norm.variance_epsilon)
        self.layer_eps = [(float(layer.input_layernorm.variance_epsilon),
                           float(layer.post_attention_layernorm.variance_epsilon)) for layer in inner.layers]
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = float(inner.layers[0].self_attn.scaling)
        self.kernel = kernel
        self.ops = ops  # our C kernels for the norms, rotary embedding and MLP activation (bf16 on a CPU)
        # A decode step's layers in one C call (kernels.DecodeLayers), where every layer's parts are our kernels'.
        self.stack = stack if stack is not None and kernel is not None and ops is not None else None
        self._inter = config.intermediate_size
        self._table = self._stack_table() if self.stack is not None else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
                attention_mask: torch.Tensor | None = None) -> DecodeOutput:
        """input_ids, position_ids: (B, S) long; cache: the batch's KV (P positions), which grows by
        these S; attention_mask: (B, P+S), nonzero where a row attends (None: everywhere).
        The logits are the last position's only, as transformers' `logits_to_keep=1` gives them."""
        if input_ids.shape[1] != 1:
            return self._prefill(input_ids, position_ids, cache, attention_mask)
        parts = self.parts
        B = input_ids.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        mask = attention_mask.bool() if attention_mask is not None else None  # (B, T+1)
        sdpa_mask = mask[:, None, None, :] if mask is not None else None  # (B, 1, 1, T+1)
        x = parts.embed(input_ids[:, 0])  # (B, hidden)
        ops = self._ops(x)
        # 1. The rotary angles of every row's position, once for all layers: (B, D).
        cos, sin = (t[:, 0] for t in parts.rotary(x, position_ids))
        x, h = self._add_norm(ops, x, None, parts.layers[0].norm_in, self.layer_eps[0][0])
        if self._table is not None and ops is not None and B <= STACK_ROWS and all(
                isinstance(layer, AppendLayer) and layer.is_initialized for layer in cache.layers):
            # 2-3 below, in C: the same kernels on the same buffers, one call for all layers.
            self.stack(self._table, x, h, cos.contiguous(), sin.contiguous(), mask,
                       [layer.extend(1) for layer in cache.layers], H, KV, self._inter, self.scaling)
            return DecodeOutput(parts.lm_head(h)[:, None, :])
        for i, (layer, cache_layer) in enumerate(zip(parts.layers, cache.layers)):
            # 2. Attention: project q, k and v at once, rotate q and k together (rotate_half, as
            #    transformers), append k and v to the cache, attend over it.
            qkv = layer.qkv(h)  # (B, (H + 2 KV) D)
            qk = self._rotate(ops, qkv, H + KV, cos, sin)  # (B, H + KV, D)
            # keys, values: (B, KV, T+1, D)
            keys, values = cache_layer.update(qk[:, H:, None], qkv[:, (H + KV) * D:].view(B, KV, 1, D))
            attended = self._attend(qk[:, :H].view(B, KV, H // KV, D), keys, values, mask, sdpa_mask)
            x, h = self._add_norm(ops, x, layer.o(attended.reshape(B, H * D)), layer.norm_post, self.layer_eps[i][1])
            # 3. The MLP, down(silu(gate(h)) * up(h)), and the next layer's (or the final) norm.
            x, h = self._add_norm(ops, x, layer.down(self._silu_mul(ops, layer.gate_up(h))), *self._next_norm(i))
        return DecodeOutput(parts.lm_head(h)[:, None, :])  # (B, 1, V)

    def static_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                    column: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """A decode step whose shapes never change, for a CUDA graph (storygen/graphs.py).

        input_ids, position_ids: (b,) long; mask: (b, c) bool, the columns each row attends to;
        column: (1,) long, where this step's keys and values go; keys, values: each layer's (b, KV, c, D)
        buffers, written at `column` in place. Returns the logits, (b, V). Plain torch ops on these
        tensors only (no C kernels, no host syncs, no shape that depends on a value), so a capture
        replays it exactly; `forward` does the same arithmetic over a batch's own columns.
        """
        parts = self.parts
        b = input_ids.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        sdpa_mask = mask[:, None, None, :]  # (b, 1, 1, c)
        x = parts.embed(input_ids)  # (b, hidden)
        cos, sin = (t[:, 0] for t in parts.rotary(x, position_ids[:, None]))  # (b, D) each
        x, h = self._add_norm(None, x, None, parts.layers[0].norm_in, self.layer_eps[0][0])
        for i, (layer, layer_keys, layer_values) in enumerate(zip(parts.layers, keys, values)):
            qkv = layer.qkv(h)  # (b, (H + 2 KV) D)
            qk = self._rotate(None, qkv, H + KV, cos, sin)  # (b, H + KV, D)
            layer_keys.index_copy_(2, column, qk[:, H:, None])
            layer_values.index_copy_(2, column, qkv[:, (H + KV) * D:].view(b, KV, 1, D))
            attended = nn.functional.scaled_dot_product_attention(
                qk[:, :H].view(b, KV, H // KV, D), layer_keys, layer_values, attn_mask=sdpa_mask, scale=self.scaling)
            x, h = self._add_norm(None, x, layer.o(attended.reshape(b, H * D)), layer.norm_post, self.layer_eps[i][1])
            x, h = self._add_norm(None, x, layer.down(self._silu_mul(None, layer.gate_up(h))), *self._next_norm(i))
        return parts.lm_head(h)  # (b, V)

    def _prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
                 attention_mask: torch.Tensor | None) -> DecodeOutput:
        """forward for S > 1 new tokens a row: a prompt, after whatever prefix the cache holds."""
        parts = self.parts
        B, S = input_ids.shape
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        P = cache.get_seq_length()
        mask = None
        if attention_mask is not None or P:
            # (B, 1, S, P+S): a row's query i sees its own unpadded keys up to position P+i; a padding
            # query sees itself too, so no row of the mask is empty (SDPA would give NaN there).
            keys = torch.arange(P + S, device=input_ids.device)[None, :]  # (1, P+S)
            queries = torch.arange(P, P + S, device=input_ids.device)[:, None]  # (S, 1): their positions
            mask = (keys <= queries)[None, None].expand(B, 1, S, P + S)
            if attention_mask is not None:
                mask = (mask & attention_mask.bool()[:, None, None, :]) | (keys == queries)
        x = parts.embed(input_ids)  # (B, S, hidden)
        ops = self._ops(x)
        cos, sin = parts.rotary(x, position_ids)  # (B, S, D)
        x, h = self._add_norm(ops, x, None, parts.layers[0].norm_in, self.layer_eps[0][0])
        last = len(parts.layers) - 1
        for i, (layer, cache_layer) in enumerate(zip(parts.layers, cache.layers)):
            qkv = layer.qkv(h)  # (B, S, (H + 2 KV) D)
            qk = self._rotate(ops, qkv, H + KV, cos, sin)  # (B, S, H + KV, D)
            keys, values = cache_layer.update(qk[:, :, H:].transpose(1, 2),
                                              qkv[..., (H + KV) * D:].view(B, S, KV, D).transpose(1, 2))
            attended = nn.functional.scaled_dot_product_attention(
                qk[:, :, :H].transpose(1, 2), keys, values, attn_mask=mask, is_causal=mask is None,
                scale=self.scaling, enable_gqa=H != KV).transpose(1, 2)  # (B, S, H, D)
            if i == last:  # past the last layer's attention only the last position's logits matter
                attended, x = attended[:, -1:], x[:, -1:]
            x, h = self._add_norm(ops, x, layer.o(attended.reshape(*x.shape[:2], H * D)), layer.norm_post,
                                  self.layer_eps[i][1])
            x, h = self._add_norm(ops, x, layer.down(self._silu_mul(ops, layer.gate_up(h))), *self._next_norm(i))
        return DecodeOutput(parts.lm_head(h))  # (B, 1, V)

    def _stack_table(self):
        """The layers for kernels.DecodeLayers, or None where some part is not on our kernels (then each
        layer runs here, part by part)."""
        def linear(module: nn.Module) -> StackLinear | None:
            kind = {Int4Linear: 4, DualLinear: 8}.get(type(module))
            if kind is None or module.native is None or module.bias is not None or module.small_rows < STACK_ROWS:
                return None
            return StackLinear(kind, module.out_features, module.in_features, module.native_weight)

        layers, count = [], len(self.parts.layers)
        if self.heads % self.kv_heads or self.heads // self.kv_heads > MAX_GROUP or self.head_dim > MAX_HEAD_DIM:
            return None
        for i, layer in enumerate(self.parts.layers):
            parts = [linear(m) for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
            norm_next, eps_next = self._next_norm(i)
            norms = (layer.norm_post, norm_next)
            if None in parts or any(n.dtype != torch.bfloat16 or not n.is_contiguous() for n in norms) or \
                    parts[2].out_features != 2 * self._inter:
                return None
            layers.append(StackLayer(layer.norm_post, self.layer_eps[i][1], norm_next, eps_next, *parts))
        self._stack_layers = layers  # the table points into their tensors
        return self.stack.table(layers) if count else None

    # --- the small operations: our C kernels (kernels.LayerOps) for bf16 on a CPU, else torch --------

    def _ops(self, x: torch.Tensor) -> LayerOps | None:
        return self.ops if self.ops is not None and LayerOps.fits(x) else None

    def _next_norm(self, i: int) -> tuple[torch.Tensor, float]:
        """The norm after layer i's MLP: the next layer's input norm, or the model's final one."""
        layers = self.parts.layers
        return (layers[i + 1].norm_in, self.layer_eps[i + 1][0]) if i + 1 < len(layers) else (self.parts.norm, self.eps)

    @staticmethod
    def _add_norm(ops: LayerOps | None, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its LlamaRMSNorm): the residual stream and the next block's input."""
        if ops is not None:
            return x, ops.add_rms_norm(x, delta, weight, eps)  # x grows in place
        x = x + delta if delta is not None else x
        return x, _rms_norm(x, weight, eps)

    def _rotate(self, ops: LayerOps | None, qkv: torch.Tensor, heads: int, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """qkv's first `heads` heads (queries, then keys) rotated: (..., heads, D). cos, sin: (..., D), per row."""
        D = self.head_dim
        if ops is not None:
            ops.rotary_(qkv, heads, cos, sin)  # in place, in qkv
            return qkv[..., : heads * D].view(*qkv.shape[:-1], heads, D)
        qk = qkv[..., : heads * D].view(*qkv.shape[:-1], heads, D)
        cos, sin, half = cos.unsqueeze(-2), sin.unsqueeze(-2), D // 2
        return qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin

    @staticmethod
    def _silu_mul(ops: LayerOps | None, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, from gate and up side by side."""
        if ops is not None:
            return ops.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                sdpa_mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, KV, G, D): each key/value head's query heads; keys, values (B, KV, T, D). Returns (B, KV, G, D)."""
        if self.kernel is not None and self.kernel.fits(q, keys, values, mask):
            return self.kernel(q, keys, values, mask, self.scaling)
        return nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=sdpa_mask, scale=self.scaling)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: normalise in fp32, back to x's dtype, then scale."""
    return weight * nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
