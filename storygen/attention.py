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
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "storygen_sdpa"
EXTRAS = ("softcap", "sliding_window", "s_aux", "position_bias")  # left to transformers' path


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query: (B, H, q, D); key, value: (B, KV, T, D)."""
    B, H, q_length, D = query.shape
    KV = key.shape[1]
    if (q_length != 1 or KV == H or H % KV or dropout or module.training
            or any(kwargs.get(name) is not None for name in EXTRAS)
            or (attention_mask is not None and attention_mask.shape[1] != 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # Each key/value head's H/KV query heads as rows: (B, KV, H/KV, D); a (B, 1, 1, T) mask broadcasts.
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(B, KV, H // KV, D), key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, H, 1, value.shape[-1]).transpose(1, 2).contiguous(), None  # (B, 1, H, Dv)


def register() -> str:
    """Make "storygen_sdpa" known to transformers (idempotent); returns the name to set."""
    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def can_use(model: torch.nn.Module, device: torch.device, mode: str = "auto") -> bool:
    """Whether STORYGEN_DECODE_ATTENTION=`mode` applies: a model that runs SDPA attention, on a CPU for auto."""
    if mode == "false" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    return mode == "true" or device.type == "cpu"
