"""A decode step replayed as a CUDA graph: a few launches where the eager step makes hundreds.

On a GPU a small model's decode step is bound by launching kernels, not by arithmetic: the
lean step (decoder.py) launches about a dozen per layer, SmolLM2-135M's 30 layers some 400,
each a few microseconds of Python and driver time for microseconds of work. A CUDA graph
records the launches once and replays them in one call, as vLLM and gpt-fast do for decoding.

A graph replays fixed addresses and shapes, so the step it records is the lean decoder's
`static_step`, and what changes from step to step becomes data:
- Rows: a batch of B rows runs the graph of the next bucket of rows (1, 2, 4, 8, … up to the
  cap); the rows past B are padding, whose outputs are dropped.
- The KV cache: the batch's layers are `PoolLayer`s, AppendLayers (kvcache.py) whose buffers
  belong to this object and stay put from batch to batch; they are made again only when a batch
  outgrows them: with the rows the engine makes room for (twice the running rows, up to the cap,
  as for the eager step) and the columns rounded up to a power of two. A step reads
  columns [0, c) for the next bucket of columns c (64, 128, 256, …) with a mask that hides
  whatever is not the batch's, and writes its key and value at a column given as a tensor.
- Inputs: the tokens, positions, mask and column are copied into fixed buffers before a replay.
A graph is recorded the first time its (rows, columns) bucket is needed, on that step's own
inputs: a step writes the same keys and values wherever it runs, so the warm-up runs that a
capture needs change nothing. New buffers drop the graphs, to be recorded again.

A new graph's first replay must agree with the step run without it. If a capture fails or
disagrees, one warning is logged and the same static step runs without a graph from then on;
if the buffers do not fit in memory, the engine's steps run eagerly from then on (`stop`).
On a CPU there is nothing to record and the static step runs as it is: the suite checks its
arithmetic and bookkeeping there (tests/test_graphs.py), and benchmarks/device_check.py checks
the replays on a GPU.

STORYGEN_CUDA_GRAPHS: auto (where the lean step serves a CUDA device), false.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from storygen.decoder import LeanDecoder
from storygen.kvcache import AppendLayer

logger = logging.getLogger(__name__)

MIN_COLUMNS = 64  # the smallest bucket of columns, and of a pool's buffers
DYNAMIC_ROPE = ("dynamic", "longrope")  # rotary embeddings that look at the positions' values on the host


def can_use(decoder: LeanDecoder | None, device: torch.device, mode: str = "auto") -> bool:
    """Whether STORYGEN_CUDA_GRAPHS=`mode` records `decoder`'s decode steps on `device`."""
    if mode == "false" or decoder is None or device.type != "cuda":
        return False
    return getattr(decoder.parts.rotary, "rope_type", "default") not in DYNAMIC_ROPE


def bucket(n: int, smallest: int, cap: int | None = None) -> int:
    """The power of two from `smallest` up that holds n, or `cap` when that is smaller."""
    size = smallest
    while size < n:
        size *= 2
    return size if cap is None else min(size, cap)


class PoolLayer(AppendLayer):
    """An AppendLayer whose buffers are its GraphedDecode's `index`th layer's: they outlive the
    batch, and are made again (zeroed, the columns a power of two) only when they are too small."""

    def __init__(self, owner: GraphedDecode, index: int) -> None:
        super().__init__()
        self._owner, self._index = owner, index
        self._k, self._v = owner.buffers[index]

    def _room(self, keys: torch.Tensor, values: torch.Tensor, rows: int,
              columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._owner.active:  # the static step was stopped: a plain AppendLayer from now on
            return super()._room(keys, values, rows, columns)
        k = self._k
        if k is None or k.shape[0] < rows or k.shape[-2] < columns or k.dtype != keys.dtype:
            return self._owner.grow(self._index, keys, values, rows=rows, columns=columns)
        return k, self._v


class GraphedDecode:
    """The engine's decode steps through `decoder.static_step`, replayed as CUDA graphs where `record`."""

    def __init__(self, decoder: LeanDecoder, max_batch: int, device: torch.device, record: bool) -> None:
        self.decoder = decoder
        self.max_batch = max_batch
        self.record = record  # False: run the static step as it is (a CPU; after a failed capture)
        self.active = True  # False: the engine's steps run eagerly (stop), its PoolLayers are plain AppendLayers
        # Each layer's (rows, KV, columns, D) keys and values: made by the batches' first PoolLayers.
        self.buffers: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(decoder.parts.layers)
        self.captures = 0  # graphs recorded, over this object's life
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._column = torch.zeros(1, dtype=torch.long, device=device)
        self._mask = torch.zeros(max_batch, 0, dtype=torch.bool, device=device)  # (rows, columns), with the buffers

    def new_cache(self, config) -> DynamicCache:
        """An empty cache for a new batch, on this object's buffers."""
        cache = DynamicCache(config=config)
        cache.layers = [PoolLayer(self, i) for i in range(len(cache.layers))]
        return cache

    def grow(self, index: int, keys: torch.Tensor, values: torch.Tensor, rows: int,
             columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s buffers made again, with room for `rows` rows and `columns` columns at
        least; the graphs recorded on the old ones go."""
        columns = bucket(columns, MIN_COLUMNS)
        try:
            k, v = self._allocate(keys, values, rows, columns)
        except torch.OutOfMemoryError:
            # Unlike the eager step's, these buffers hold every column up to a power of two, and the
            # graphs' memory comes on top. The caller's step fails as any step out of memory does (the
            # worker lowers its cap), and the steps after it run eagerly.
            self.stop(f"KV buffers for {rows} rows and {columns} columns do not fit in memory")
            raise
        self.buffers[index] = (k, v)
        if self._mask.shape != (rows, columns):
            self._mask = torch.zeros(rows, columns, dtype=torch.bool, device=k.device)
        self._graphs.clear()
        return k, v

    @staticmethod
    def _allocate(keys: torch.Tensor, values: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Zeros, not garbage: a masked column's value is still multiplied by its weight of zero.
        return (keys.new_zeros(rows, keys.shape[1], columns, keys.shape[3]),
                values.new_zeros(rows, values.shape[1], columns, values.shape[3]))

    def stop(self, reason: str) -> None:
        """No more static steps: the engine's decode steps run eagerly from now on, and the buffers go."""
        logger.warning("decode steps run eagerly from now on, without CUDA graphs: %s", reason)
        self.active = self.record = False
        self._graphs.clear()
        self.buffers = [(None, None)] * len(self.buffers)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
             cache: DynamicCache) -> torch.Tensor:
        """One decode step: tokens, positions (B,); mask (B, T+1), nonzero where a row attends (None:
        everywhere); cache: a batch cache of PoolLayers holding T positions, which grow by one.
        Returns the logits (B, V)."""
        layers = cache.layers
        B, T = tokens.shape[0], layers[0].keys.shape[-2]
        first = layers[0]
        if first._start and bucket(first._start + T + 1, MIN_COLUMNS) > bucket(T + 1, MIN_COLUMNS):
            for layer in layers:  # the columns dropped on the left would make the step read a larger bucket
                layer.set(layer.keys, layer.values, spare=1)
        for layer in layers:
            layer.extend(1)  # where there is no room, the buffers are made again (and the graphs go)
        start, column = first._start, first._start + T
        # The buffers have the rows the engine made room for (twice the batch's, up to the cap, as the eager
        # step's): the bucket of rows, or all of them where that is fewer.
        rows = min(bucket(B, 1, self.max_batch), first._k.shape[0])
        columns = bucket(column + 1, MIN_COLUMNS)
        self._ids[:B] = tokens
        self._ids[B:rows] = 0
        self._positions[:B] = positions
        self._positions[B:rows] = 0
        window = self._mask[:rows, :columns]
        window.zero_()
        if mask is None:
            window[:B, start:column + 1] = True
        else:
            window[:B, start:column + 1] = mask.bool()
        window[B:rows, column] = True  # a padding row attends to its own column, so no row of the mask is empty
        self._column.fill_(column)
        if not self.record:
            return self._run(rows, columns)[:B]
        graph = self._graphs.get((rows, columns))
        if graph is None:
            try:
                graph = self._graphs[rows, columns] = self._capture(rows, columns)
            except Exception as error:  # a graph is an optimisation: the step itself must still run
                logger.warning("a CUDA graph of the decode step failed (%r); decode steps run without graphs", error)
                self.record = False
                self._graphs.clear()
                return self._run(rows, columns)[:B]
        graph[0].replay()
        return graph[1][:B]

    def _run(self, rows: int, columns: int) -> torch.Tensor:
        keys = [k[:rows, :, :columns] for k, _ in self.buffers]
        values = [v[:rows, :, :columns] for _, v in self.buffers]
        return self.decoder.static_step(self._ids[:rows], self._positions[:rows], self._mask[:rows, :columns],
                                        self._column, keys, values)

    def _capture(self, rows: int, columns: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the static step for (rows, columns) on the inputs in the buffers, as torch's docs do:
        warm-up runs on a side stream first (cuBLAS and the allocator set themselves up there). The
        first replay must give what the last warm-up run gave, or the graph is not used."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                want = self._run(rows, columns)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self._run(rows, columns)
        graph.replay()
        if not agree(output, want):
            raise RuntimeError(f"a replay for {rows} rows and {columns} columns differs from the step it recorded")
        self.captures += 1
        logger.debug("recorded the decode step's CUDA graph for %s rows and %s columns", rows, columns)
        return graph, output


def agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether two runs of a step gave the same logits, within the rounding of their dtype."""
    got, want = got.float(), want.float()
    scale = want.abs().max().clamp(min=1.0)
    return bool(((got - want).abs().max() <= 1e-2 * scale).item())
