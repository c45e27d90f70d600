"""Keys and values of prompt prefixes already computed, reused by later prompts that start the same way.

The framing of a prompt (the chat template and the genre's instructions) is the same for
every story of a genre, so its key/value cache need not be recomputed for each one. As in
vLLM's automatic prefix caching, a prompt is cut into blocks of BLOCK_TOKENS tokens, and each
full block's KV is kept under its own tokens *and* everything before it (the parent block),
so a block is found only after the same prefix. A new prompt reuses its longest run of cached
blocks and computes the rest; afterwards its own full blocks are added.

Memory is bounded by `max_bytes`; the least recently used blocks go first. A lookup touches a
chain from its last block back to its first, so a parent is always more recent than its
children: eviction takes leaves first and never strands a child without its parent.

Keys hold their positions (RoPE rotates them by absolute position), so a block is reusable only
at the position it was computed at; here that is always so, as every prompt starts at 0. The
engine reads and writes this cache from one thread, like the rest of the engine.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BLOCK_TOKENS = 8  # small, so most of a ~26-token framing is reused; each block costs one dict entry


@dataclass(eq=False)
class _Block:
    key: tuple[int, tuple[int, ...]]  # (parent block's id, or -1 at the start; this block's tokens)
    id: int
    kv: torch.Tensor  # (layers, 2, kv_heads, BLOCK_TOKENS, head_dim): keys then values


class PrefixCache:
    """Full prompt blocks' KV by (parent, tokens), least recently used out first."""

    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.bytes = 0
        self.hits = self.lookups = 0  # prompt tokens found cached / looked up, for the metrics
        self._index: dict[tuple[int, tuple[int, ...]], _Block] = {}
        self._lru: OrderedDict[int, _Block] = OrderedDict()  # oldest first
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._lru)

    def peek(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` a lookup would find, without counting it as a use."""
        return len(self._chain(ids)) * self.block_tokens

    def lookup(self, ids: list[int], count: bool = True) -> tuple[int, torch.Tensor | None]:
        """(n, kv): the first n tokens' cached KV, (layers, 2, kv_heads, n, head_dim), or (0, None).

        n is a multiple of the block size and below len(ids): the last token is always left to
        compute, because its logits are what the prefill is for. count: whether the metrics count
        it (a piece of a prompt, Engine.prefill_part, is counted once, when the prompt is prefilled).
        """
        chain = self._chain(ids)
        self._touch(chain)
        if count:
            self.lookups += len(ids)
            self.hits += len(chain) * self.block_tokens
        if not chain:
            return 0, None
        return len(chain) * self.block_tokens, torch.cat([b.kv for b in chain], dim=3)

    def insert(self, ids: list[int], kv: torch.Tensor, start: int) -> None:
        """Add the full blocks of `ids` from token `start` (a block boundary) on.

        kv: (layers, 2, kv_heads, len(ids) - start, head_dim), the KV of ids[start:].
        The blocks before `start` must be cached already (lookup found them); if some were
        evicted meanwhile, nothing is added.
        """
        B = self.block_tokens
        chain = self._chain(ids, limit=start // B)
        if len(chain) * B != start:
            return
        parent = chain[-1].id if chain else -1
        for first in range(start, len(ids) - B + 1, B):
            key = (parent, tuple(ids[first:first + B]))
            block = self._index.get(key)
            if block is None:
                block = _Block(key, next(self._ids), kv[:, :, :, first - start:first - start + B].clone())
                self._index[key] = block
                self._lru[block.id] = block  # evictable at once, should a later block's copy run out of memory
                self.bytes += block.kv.numel() * block.kv.element_size()
            chain.append(block)
            parent = block.id
        self._touch(chain)
        self._evict()

    def clear(self) -> None:
        self._index.clear()
        self._lru.clear()
        self.bytes = 0

    def _chain(self, ids: list[int], limit: int | None = None) -> list[_Block]:
        """The cached blocks that `ids` starts with, in order, leaving its last token out."""
        B = self.block_tokens
        most = (len(ids) - 1) // B if limit is None else limit
        chain, parent = [], -1
        for k in range(most):
            block = self._index.get((parent, tuple(ids[k * B:(k + 1) * B])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        for block in reversed(chain):  # the first block ends up the most recent
            self._lru[block.id] = block
            self._lru.move_to_end(block.id)

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._lru:
            _, block = self._lru.popitem(last=False)
            del self._index[block.key]
            self.bytes -= block.kv.numel() * block.kv.element_size()
