"""Attention for a decode step on a CPU: SDPA on the key/value heads, never SDPA's `enable_gqa`.

SmolLM2 has 9 query heads over 3 key/value heads (grouped-query attention). For one new token
per row, transformers' SDPA path packs each key/value head's 3 query heads as 3 query rows
(`pack_gqa`), and SDPA runs on the cache as it is; but only when there is an attention mask.
With none (a lone story, or a batch whose rows all have the same length) it asks torch for
`enable_gqa=True` instead, and torch's CPU kernel for that is about 5x slower: 1.66 against
0.30 ms a layer at 16 rows and 200 positions, 0.12 against 0.03 ms at one row (this 2-core
CPU, bf16). At 30 layers that is 40 ms of a batch-16 step.

So this attention function, registered with transformers as "storygen_sdpa" with SDPA's own
mask function, packs the query heads for every single-token call on a CPU, mask or not, and
hands everything else (prefill, GPUs, models without grouped heads) to transformers' SDPA
path unchanged. The arithmetic is SDPA's either way. STORYGEN_DECODE_ATTENTION: auto (CPUs),
true (any device), false.

Where our own C kernel for this shape is at hand (storygen/kernels.py: bf16 on a CPU, about
twice SDPA's speed here), it is registered as "storygen_native" and takes the single-token
calls it fits; the rest go the way above.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from storygen.kernels import DecodeAttention

NAME = "storygen_sdpa"
NATIVE_NAME = "storygen_native"
EXTRAS = ("softcap", "sliding_window", "s_aux", "position_bias")  # left to transformers' path


def _plain_decode(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, dropout: float,
                  attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """One query token per row, grouped heads, nothing but a padding mask: the call both paths take."""
    H, q_length, KV = query.shape[1], query.shape[2], key.shape[1]
    return not (q_length != 1 or KV == H or H % KV or dropout or module.training
                or any(kwargs.get(name) is not None for name in EXTRAS)
                or (attention_mask is not None and attention_mask.shape[1] != 1))


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query: (B, H, q, D); key, value: (B, KV, T, D)."""
    if not _plain_decode(module, query, key, dropout, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    B, H, _, D = query.shape
    KV = key.shape[1]
    # Each key/value head's H/KV query heads as rows: (B, KV, H/KV, D); a (B, 1, 1, T) mask broadcasts.
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(B, KV, H // KV, D), key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, H, 1, value.shape[-1]).transpose(1, 2).contiguous(), None  # (B, 1, H, Dv)


def native_decode_attention(kernel: DecodeAttention, module: torch.nn.Module, query: torch.Tensor,
                            key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """decode_attention, with the single-token calls that fit it on our C kernel."""
    if _plain_decode(module, query, key, dropout, attention_mask, kwargs):
        B, H, _, D = query.shape
        KV, T = key.shape[1], key.shape[2]
        packed = query.reshape(B, KV, H // KV, D)  # (B, KV, G, D)
        mask = None
        if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape == (B, 1, 1, T):
            mask = attention_mask[:, 0, 0, :]  # (B, T), True where the row attends
        if (attention_mask is None or mask is not None) and kernel.fits(packed, key, value, mask):
            out = query.new_empty(B, 1, H, D)  # the layout the model wants next, written by the kernel directly
            kernel(packed, key, value, mask, scaling if scaling is not None else D ** -0.5,
                   out=out.view(B, KV, H // KV, D))
            return out, None
    return decode_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register(kernel: DecodeAttention | None = None) -> str:
    """Make our attention known to transformers (idempotent); returns the name to set on a model:
    "storygen_native" with `kernel`, else "storygen_sdpa"."""
    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if kernel is None:
        return NAME
    AttentionInterface.register(NATIVE_NAME, functools.partial(native_decode_attention, kernel))
    AttentionMaskInterface.register(NATIVE_NAME, sdpa_mask)
    return NATIVE_NAME


def can_use(model: torch.nn.Module, device: torch.device, mode: str = "auto") -> bool:
    """Whether STORYGEN_DECODE_ATTENTION=`mode` applies: a model that runs SDPA attention, on a CPU for auto."""
    if mode == "false" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    return mode == "true" or device.type == "cpu"
