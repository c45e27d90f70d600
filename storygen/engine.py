"""The batched decoder: many stories share one forward pass per token.

This is continuous batching in eager PyTorch. A sequence joins the running batch at
the next step when a slot is free (sequences admitted together are prefilled in one
left-padded pass, starting from whatever prefix of theirs the prefix cache holds, then
their KV cache is left-padded into the batch's), and leaves the moment it finishes.
Each row keeps its own temperature, top_p, top_k, repetition penalty, length and random stream.

Why our own loop rather than transformers' continuous-batching manager: the manager
takes one GenerationConfig for all requests, so per-row settings and per-row seeds
are impossible, and it owns its own scheduler, where we need a fair per-user queue
in front (see worker.py). We still use the library for the model, its DynamicCache
and its attention masking; only the loop is ours.

The engine is synchronous and single-threaded: the worker calls `step()` from its
engine loop, the CLI calls it directly.
"""

from __future__ import annotations

import logging
import random
import secrets
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from storygen import graphs
from storygen.kvcache import (AppendLayer, add_rows, cache_argument, keep_rows, new_cache, pad_left,
                              replace_layer, restore, truncate_layer)
from storygen.model import LoadedModel
from storygen.prefix_cache import PrefixCache
from storygen.sampling import END_BOOST, RowKnobs, SamplingParams, ending_bias, sample_next
from storygen.transfer import to_device

logger = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One story being generated: its prompt, settings and the tokens so far."""

    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int = -1  # the seed in use; drawn at random when params.seed is None
    generated: list[int] = field(default_factory=list)
    generator: random.Random | None = None  # its draws (sampling.sample_next)
    finish_reason: str | None = None  # "stop" (end-of-story token), "length", "aborted"
    wrote: bool = False  # some token it wrote is not only whitespace; until then it may not stop (see _shape)
    steer_ids: tuple[int, ...] = ()  # its genre's word tokens, which the genre steer raises (storygen/steer.py)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepOutput:
    """What one step did for one sequence: a new token, and whether it finished."""

    seq_id: str
    token_id: int | None  # None when the sequence finished without a new token (aborted)
    finish_reason: str | None


@dataclass
class SteerPairs:
    """The genre steer's (row, token) pairs of a batch (Engine._steer_pairs), each to raise or done with."""

    rows: torch.Tensor  # (N,) long
    ids: torch.Tensor  # (N,) long
    todo: torch.Tensor  # (N,) float: 1 while the row has not written the token, then 0

    def wrote(self, tokens: torch.Tensor) -> None:
        """tokens: (B,) what each row sampled this step."""
        if self.rows.numel():
            self.todo.mul_((tokens[self.rows] != self.ids).float())


class SequenceError(Exception):
    """A failure that belongs to one sequence only (its prefill failed)."""

    def __init__(self, seq_id: str, error: BaseException) -> None:
        super().__init__(f"{seq_id}: {error!r}")
        self.seq_id = seq_id
        self.error = error


class Engine:
    """Owns the model's running batch. Not thread-safe: one thread calls it."""

    def __init__(self, lm: LoadedModel, max_batch: int, append_cache: bool = True, prefix_cache_bytes: int = 0,
                 genre_steer: float = 0.0, static_decode: bool | None = None) -> None:
        self.lm = lm
        self.genre_steer = genre_steer  # nats added to each row's steer_ids' logits; 0: off
        self.max_batch = max_batch
        self.append_cache = append_cache  # in-place KV appends (kvcache.py); False: transformers' torch.cat
        # Prompt prefixes' KV kept for reuse (prefix_cache.py); only where every layer is plain full
        # attention, whose KV a later prompt can take as it is.
        reusable = append_cache and all(isinstance(layer, AppendLayer) for layer in new_cache(lm.model.config).layers)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 and reusable else None
        if prefix_cache_bytes > 0 and not reusable:
            logger.warning("the prefix cache is off: this model's KV cache is not plain full attention")
        self._cache_arg = cache_argument(lm.model)  # "cache", or "past_key_values" before transformers 5.24
        # Decode steps of fixed shapes, replayed as CUDA graphs (graphs.py): where the model's setting asks
        # (lm.cuda_graphs), or where a caller asks (static_decode; on a CPU the static step runs as it is).
        static = lm.cuda_graphs if static_decode is None else static_decode
        self._graphs = graphs.GraphedDecode(lm.decoder, max_batch, lm.device, record=lm.device.type == "cuda") \
            if static and append_cache and lm.decoder is not None else None
        self.rows: list[Sequence] = []  # the running batch, in cache order
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=lm.device)  # (B, T): 0 where left-padded
        self._padded = False  # any zero in _mask; lets batch-1 and aligned batches skip the mask
        self._positions = torch.zeros(0, dtype=torch.long, device=lm.device)  # (B,) next position id per row
        self._next = torch.zeros(0, dtype=torch.long, device=lm.device)  # (B,) last sampled token, fed next
        self._seen = torch.zeros(0, lm.vocab_size, dtype=torch.bool, device=lm.device)  # (B, V) for the penalty
        self._knobs: RowKnobs | None = None
        self._penalise = False  # some row has a repetition penalty, so `_seen` is used
        self._end_ids = torch.tensor(sorted(lm.end_ids), dtype=torch.long, device=lm.device)  # (E,) for the steer
        self._stop_ids = torch.tensor(sorted(lm.stop_ids), dtype=torch.long, device=lm.device)  # (S,)
        self._steer_index: SteerPairs | None = None  # the running batch's; None: rebuild at the next step
        # How sampling.penalise applies the repetition penalty: None by the device (sparse on a CPU, dense
        # elsewhere, which saves a GPU a wait each step); a benchmark sets False to count steps as a GPU runs them.
        self.sparse_penalty: bool | None = None

    # --- admission and removal ---------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch - len(self.rows))

    @torch.inference_mode()
    def start(self, seq: Sequence) -> StepOutput:
        """Prefill one sequence, sample its first token, and add it to the running batch."""
        result = self.start_many([seq])[0]
        if isinstance(result, SequenceError):
            raise result
        return result

    @torch.inference_mode()
    def start_many(self, seqs: list[Sequence]) -> list[StepOutput | SequenceError]:
        """Prefill several sequences in one left-padded forward pass and add them to the batch.

        One result per sequence, in order: its first token, or the SequenceError that failed
        it alone. When the shared pass fails, each is retried alone, so a bad request is
        found and fails by itself (and an out-of-memory batch gets smaller prefills).
        """
        results: list[StepOutput | SequenceError | None] = [None] * len(seqs)
        ready = []
        for i, seq in enumerate(seqs):
            if seq.generator is None:
                seq.seed = seq.params.seed if seq.params.seed is not None else secrets.randbits(32)
                seq.generator = random.Random(seq.seed)
            try:
                self._check_fits(seq)
                ready.append(i)
            except ValueError as error:
                results[i] = SequenceError(seq.seq_id, error)
        try:
            outputs = self._prefill([seqs[i] for i in ready]) if ready else []
        except Exception as error:
            if len(ready) == 1:
                outputs = [SequenceError(seqs[ready[0]].seq_id, error)]
            else:
                logger.warning("a batched prefill of %s sequences failed (%r); prefilling them one by one",
                               len(ready), error)
                outputs = [_or_error(self._prefill, seqs[i]) for i in ready]
        for i, output in zip(ready, outputs):
            results[i] = output
        return results

    @torch.inference_mode()
    def abort(self, seq_id: str) -> bool:
        """Free a running sequence's slot now. Returns whether it was running."""
        for index, seq in enumerate(self.rows):
            if seq.seq_id == seq_id:
                seq.finish_reason = "aborted"
                self._keep([i for i in range(len(self.rows)) if i != index])
                return True
        return False

    @torch.inference_mode()
    def abort_all(self) -> list[Sequence]:
        """Drop the whole batch (after a failed step); returns the sequences that were in it."""
        rows = self.rows
        self._keep([])
        return rows

    # --- the step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One decode step for every running row; finished rows leave the batch at once."""
        if not self.rows:
            return []
        # 1. Feed each row the token it sampled last, at its own position.
        if self._steer_index is None:
            self._steer_index = self._steer_pairs(self.rows)
        width, length = self._mask.shape[1], self._cache.get_seq_length()
        try:
            logits = self._shape(self._forward_decode(), self.rows, self._steer_index)  # (B, V)
            # 2. Sample the next token of every row with that row's settings and generator, steering
            #    rows near the end of their length towards an ending.
            tokens = sample_next(logits, self._knobs, self._seen_or_none(), [s.generator for s in self.rows],
                                 self._end_ids, self._end_bias(self.rows, self._knobs), inplace=True,
                                 sampler=self.lm.sampler, sparse_penalty=self.sparse_penalty)
        except BaseException:  # out of memory, say: the batch is as it was before the step, to run it again
            self._mask = self._mask[:, :width]
            self._crop(length)  # the layers that grew give their column back
            raise
        self._positions = self._positions + 1
        # 3. Record it, and decide which rows are done.
        outputs = [self._record(seq, tok) for seq, tok in zip(self.rows, tokens.tolist())]
        self._steer_index.wrote(tokens)
        self._next = tokens
        self._seen[torch.arange(len(self.rows), device=tokens.device), tokens] = True
        # 4. Finished rows leave now, so their slots are free for the next admission.
        if any(o.finish_reason for o in outputs):
            self._keep([i for i, seq in enumerate(self.rows) if not seq.done])
        return outputs

    def _record(self, seq: Sequence, token: int) -> StepOutput:
        if token in self.lm.stop_ids:
            seq.finish_reason = "stop"
            return StepOutput(seq.seq_id, None, "stop")
        seq.generated.append(token)
        seq.wrote = seq.wrote or token not in self.lm.blank_ids
        if len(seq.generated) >= seq.params.length:
            seq.finish_reason = "length"
        return StepOutput(seq.seq_id, token, seq.finish_reason)

    def _shape(self, logits: torch.Tensor, seqs: list[Sequence], steer: SteerPairs) -> torch.Tensor:
        """The logits each row samples from, before its own settings: in place, and returned. logits: (B, V).

        - The genre steer: each row's genre words it has not written yet rise by `genre_steer`
          (storygen/steer.py); once written, a word is on its own, so the steer never makes a loop.
        - No stop token for a row that has written nothing but whitespace yet (vLLM's min_tokens, in
          spirit): a model that would end at once, as one may on Continue after an ending, writes on
          instead of giving the user "the model wrote nothing".
        """
        if steer.rows.numel():
            logits[steer.rows, steer.ids] += steer.todo * self.genre_steer
        empty = [i for i, seq in enumerate(seqs) if not seq.wrote]
        if empty and self._stop_ids.numel():
            index = to_device(empty, torch.long, logits.device)
            logits[index[:, None], self._stop_ids[None, :]] = float("-inf")
        return logits

    def _steer_pairs(self, seqs: list[Sequence]) -> SteerPairs:
        """Every (row, token) the genre steer raises, less the tokens each row has already written."""
        pairs = [] if self.genre_steer == 0 else [
            (i, t) for i, seq in enumerate(seqs) if seq.steer_ids
            for written in [set(seq.generated)] for t in seq.steer_ids if t not in written]
        both = to_device(pairs, torch.long, self.lm.device).reshape(-1, 2)  # (N, 2)
        return SteerPairs(both[:, 0], both[:, 1], torch.ones(len(pairs), device=self.lm.device))

    def _end_bias(self, seqs: list[Sequence], knobs: RowKnobs) -> torch.Tensor | None:
        """(B,) the ending steer's bias per row (sampling.ending_bias), or None when no row gets one."""
        if END_BOOST == 0 or not self._end_ids.numel():
            return None
        at_end = [self._at_sentence_end(seq) for seq in seqs]
        if not any(at_end):
            return None
        device = self.lm.device
        generated = to_device([len(seq.generated) for seq in seqs], torch.long, device)
        return ending_bias(generated, knobs.length, to_device(at_end, torch.bool, device))  # (B,)

    def _at_sentence_end(self, seq: Sequence) -> bool:
        """Whether the row's own text (not its prompt) ends a sentence, whitespace after it allowed."""
        for token in reversed(seq.generated):
            if token not in self.lm.blank_ids:
                return token in self.lm.sentence_end_ids
        return False

    def _forward_decode(self) -> torch.Tensor:
        """The forward of a decode step: the mask and the cache grow by a column (step undoes it on a failure)."""
        B = len(self.rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], dim=1)  # (B, T+1)
        if self._graphs is not None and self._graphs.active:
            logits = self._graphs.step(self._next, self._positions, self._mask if self._padded else None, self._cache)
        else:  # rows sit at different positions: (B, 1) each
            logits = self._forward(self._next[:, None], self._positions[:, None], self._cache,
                                   self._mask if self._padded else None)
        return logits.float()  # (B, V); sampling's softmax and top-p sums want fp32, not bf16

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's forward over (G, S) new tokens a row, appending to `cache`; the last position's
        logits, (G, V) in the model's dtype. Llama-family models go through our lean forward (decoder.py)."""
        if self.lm.decoder is not None:
            out = self.lm.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache)
        else:
            out = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :]

    def _check_fits(self, seq: Sequence) -> None:
        length = len(seq.prompt_ids) + seq.params.length
        if length > self.lm.max_positions:
            raise ValueError(f"prompt of {len(seq.prompt_ids)} tokens plus {seq.params.length} new ones exceeds "
                             f"the model's {self.lm.max_positions} positions")

    def prefill_cost(self, seq: Sequence) -> int:
        """Tokens a prefill of `seq` would compute: its prompt (and what it wrote) less any cached prefix."""
        row = seq.prompt_ids + seq.generated
        return len(row) - (self.prefix_cache.peek(row) if self.prefix_cache is not None else 0)

    def _prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Run the prompts through the model together, sample each first token, and join the batch."""
        device = self.lm.device
        rows = [seq.prompt_ids + seq.generated for seq in seqs]  # a preempted sequence resumes with what it wrote
        G = len(rows)
        # 1. Start each row's cache with its longest cached prefix (P columns, left-padded), then
        #    left-pad the rest to one width S, so every row's last token sits in the last column.
        cache, mask, cached = self._cached_prefixes(rows)  # mask: (G, P)
        rest = [r[n:] for r, n in zip(rows, cached)]
        S = max(map(len, rest))
        input_ids = to_device([[self.lm.pad_id] * (S - len(r)) + r for r in rest], torch.long, device)  # (G, S)
        mask = torch.cat([mask, to_device([[0] * (S - len(r)) + [1] * len(r) for r in rest], torch.long, device)],
                         dim=1)  # (G, P+S): 0 at padding, which sits between prefix and rest in some rows
        padded = not bool(mask.all())
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -S:]  # (G, S): each row counts from 0 at its first token
        last = self._forward(input_ids, positions, cache, mask if padded else None)  # (G, V)
        try:
            self._remember_prefixes(rows, cached, cache)
        except torch.OutOfMemoryError as error:  # the prefix cache is a saving, not the story: it goes on without
            logger.warning("the prompts' blocks were not added to the prefix cache: %s", error)
        if padded:  # padding's keys and values are never attended to; zero them so nothing odd can leak
            keep = mask.bool()[:, None, :, None]  # (G, 1, P+S, 1)
            for layer in cache.layers:
                layer.keys.masked_fill_(~keep, 0)
                layer.values.masked_fill_(~keep, 0)
        # 2. Sample each row's first token with its own settings, as a decode step would.
        seen = torch.zeros(G, self.lm.vocab_size, dtype=torch.bool, device=device)  # (G, V)
        # The whole row, cached prefix included, and never the padding.
        seen[to_device([g for g, r in enumerate(rows) for _ in r], torch.long, device),
             to_device([t for r in rows for t in r], torch.long, device)] = True
        seen[:, self._end_ids] = False  # the chat template's <|im_end|>: ending a story is no repetition
        knobs = RowKnobs.from_params([seq.params for seq in seqs], self.lm.vocab_size, device)
        penalise = any(seq.params.repetition_penalty != 1 for seq in seqs)
        logits = self._shape(last.float(), seqs, self._steer_pairs(seqs))  # (G, V), fp32 always
        tokens = sample_next(logits, knobs, seen if penalise else None, [s.generator for s in seqs],
                             self._end_ids, self._end_bias(seqs, knobs), inplace=True, sampler=self.lm.sampler,
                             sparse_penalty=self.sparse_penalty)
        outputs = [self._record(seq, tok) for seq, tok in zip(seqs, tokens.tolist())]
        seen[torch.arange(G, device=device), tokens] = True
        # 3. Rows that go on join the running batch; one that stopped at once never does.
        going = [g for g, seq in enumerate(seqs) if not seq.done]
        if len(going) < G:
            index = to_device(going, torch.long, device)
            for layer in cache.layers:
                replace_layer(layer, layer.keys[index], layer.values[index])
            mask, tokens, seen = mask[index], tokens[index], seen[index]
        if going:
            self._join([seqs[g] for g in going], cache, mask, tokens, seen)
        return outputs

    def prefill_part(self, seq: Sequence, tokens: int) -> int:
        """Compute about `tokens` more of `seq`'s prompt, whole blocks after its cached prefix, into the
        prefix cache only; it does not join the batch. Returns how many tokens it computed (0: none to do).

        A long prompt in pieces (the worker's chunked prefill): whoever arrives meanwhile waits for
        a piece, not the whole prompt, and the prompt's own prefill later starts from the pieces.
        """
        row = seq.prompt_ids + seq.generated
        return self.cache_prefix(row, tokens, end=len(row) - 1)  # the last token is its prefill's, to sample from

    @torch.inference_mode()
    def cache_prefix(self, ids: list[int], tokens: int, end: int | None = None) -> int:
        """Compute about `tokens` more of `ids`' whole blocks, up to `end` (default: all of them), after what
        the prefix cache holds of it, into the prefix cache. Returns how many it computed (0: none to do).

        For the pieces of a long prompt (prefill_part) and the genres' framings, which the worker
        computes ahead while it is idle.
        """
        if self.prefix_cache is None:
            return 0
        end = len(ids) if end is None else end
        # A lookup leaves a row's last token to compute (its logits are what a prefill is for); one token
        # more on the end, never part of a whole block, lets it find every whole block of ids[:end].
        probe = ids[:end] + [0]
        block = self.prefix_cache.block_tokens
        known = self.prefix_cache.peek(probe)
        upto = min(known + tokens, end) // block * block
        if upto <= known:
            return 0
        part = ids[:upto]
        cache, _, (cached,) = self._cached_prefixes([part + [0]], count=False)
        device = self.lm.device
        self._forward(torch.tensor([part[cached:]], device=device), torch.arange(cached, upto, device=device)[None, :],
                      cache)  # (1, S) each
        self._remember_prefixes([part], [cached], cache)
        return upto - cached

    def _cached_prefixes(self, rows: list[list[int]], count: bool = True) -> tuple[DynamicCache, torch.Tensor, list[int]]:
        """A cache holding each row's cached prefix, left-padded to the longest (P); its (G, P) mask; each length."""
        device, G = self.lm.device, len(rows)
        if self.prefix_cache is None:
            cache = new_cache(self.lm.model.config) if self.append_cache else DynamicCache(config=self.lm.model.config)
            return cache, torch.zeros(G, 0, dtype=torch.long, device=device), [0] * G
        hits = [self.prefix_cache.lookup(r, count) for r in rows]
        P = max(n for n, _ in hits)
        cache = new_cache(self.lm.model.config)
        mask = torch.zeros(G, P, dtype=torch.long, device=device)
        if P:
            kv = next(kv for n, kv in hits if n)  # (layers, 2, H, n, D)
            past = kv.new_zeros(kv.shape[0], 2, G, kv.shape[2], P, kv.shape[4])  # (layers, 2, G, H, P, D)
            for g, (n, kv) in enumerate(hits):
                if n:
                    past[:, :, g, :, P - n:] = kv
                    mask[g, P - n:] = 1
            for layer, (keys, values) in zip(cache.layers, past):
                replace_layer(layer, keys, values)
        return cache, mask, [n for n, _ in hits]

    def _remember_prefixes(self, rows: list[list[int]], cached: list[int], cache: DynamicCache) -> None:
        """Add each row's newly computed full blocks to the prefix cache."""
        if self.prefix_cache is None:
            return
        layers = cache.layers
        if len({(layer.keys.shape, layer.values.shape) for layer in layers}) != 1:
            logger.warning("the prefix cache is off: this model's layers keep KV of different shapes")
            self.prefix_cache = None
            return
        B, W = self.prefix_cache.block_tokens, layers[0].keys.shape[2]
        for g, (row, n) in enumerate(zip(rows, cached)):
            full = len(row) // B * B
            if full <= n:
                continue
            first = W - (len(row) - n)  # row g's uncomputed tokens fill the last columns, from here
            kv = torch.stack([torch.stack([layer.keys[g, :, first:first + full - n],
                                           layer.values[g, :, first:first + full - n]]) for layer in layers])
            self.prefix_cache.insert(row[:full], kv, n)  # kv: (layers, 2, H, full - n, D)

    # --- batch bookkeeping ---------------------------------------------------------------------

    def _join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor,
              seen: torch.Tensor) -> None:
        """Add prefilled rows after the batch's: whichever side is shorter is left-padded, so the caches line up."""
        width = max(self._mask.shape[1], mask.shape[1])
        graphed = self._graphs is not None and self._graphs.active
        if self._cache is None and not graphed:
            self._cache = cache
        else:  # written into the batch cache's spare rows (kvcache.AppendLayer.add_rows)
            new = self._cache is None
            if new:  # a new batch on the graphs' buffers
                self._cache = self._graphs.new_cache(self.lm.model.config)
            # Room made for twice the rows, up to the cap: on a GPU with a large model, 64 rows of room
            # made at once could take gigabytes that a few running stories don't need.
            room = min(self.max_batch, 2 * (len(self.rows) + len(seqs)))
            try:
                for mine, theirs in zip(self._cache.layers, cache.layers):
                    add_rows(mine, theirs.keys, theirs.values, rows=room)
            except BaseException:  # out of memory at some layer: the layers before it give the rows back
                if new:
                    self._cache = None
                else:
                    for layer in self._cache.layers:
                        restore(layer, len(self.rows), self._mask.shape[1])
                raise
        self._mask = torch.cat([pad_left(self._mask, width, dim=1), pad_left(mask, width, dim=1)], dim=0)
        self._padded = not bool(self._mask.all())
        self._positions = torch.cat([self._positions, mask.sum(dim=1)])  # next position: each row's length
        self._next = torch.cat([self._next, tokens])
        self._seen = torch.cat([self._seen, seen])
        self._set_rows(self.rows + seqs)

    def _keep(self, keep: list[int]) -> None:
        """Shrink the batch to the rows at `keep` (ascending), then drop padding no row needs any more.

        The last rows move into the leavers' places, so the cache copies only the rows that move
        (kvcache.AppendLayer.keep_rows); the batch's order changes, which nothing depends on."""
        if not keep:
            self.rows, self._cache, self._knobs, self._steer_index = [], None, None, None
            self._mask = self._mask[:0, :0]
            self._positions, self._next, self._seen = self._positions[:0], self._next[:0], self._seen[:0]
            self._padded = False
            return
        order = _fill_from_the_end(keep)
        self._set_rows([self.rows[i] for i in order])  # before anything moves: its knobs are the one allocation
        # The rest is done in place, making no tensor the size of the batch: out of memory half-way through
        # would leave the step's rows half-moved, and their tokens unsaid.
        B = len(order)
        for place, old in enumerate(order):
            if old != place:
                for rows in (self._mask, self._positions, self._next, self._seen):
                    rows[place] = rows[old]
        self._mask, self._positions, self._next, self._seen = (
            self._mask[:B], self._positions[:B], self._next[:B], self._seen[:B])
        # One read of the mask's columns (on a GPU, one wait): whether any row and whether every row attends.
        some, every = torch.stack([self._mask.any(dim=0), self._mask.all(dim=0)]).tolist()  # (T,) each
        first = some.index(True) if True in some else 0  # columns before it: padding in every row
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            keep_rows(layer, order, first)
        self._padded = not all(every[first:])

    def _set_rows(self, rows: list[Sequence]) -> None:
        """The batch's rows are now `rows`, in cache order: their settings as tensors for sampling."""
        knobs = RowKnobs.from_params([s.params for s in rows], self.lm.vocab_size, self.lm.device)
        self.rows, self._knobs, self._steer_index = rows, knobs, None  # the steer's pairs: rebuilt at the next step
        self._penalise = any(s.params.repetition_penalty != 1 for s in rows)

    def _crop(self, length: int) -> None:
        for layer in self._cache.layers:
            truncate_layer(layer, length)

    def _seen_or_none(self) -> torch.Tensor | None:
        return self._seen if self._penalise else None


def _or_error(prefill, seq: Sequence) -> StepOutput | SequenceError:
    try:
        return prefill([seq])[0]
    except Exception as error:
        return SequenceError(seq.seq_id, error)


def _fill_from_the_end(keep: list[int]) -> list[int]:
    """The batch order after only the rows at `keep` (ascending) stay: a kept row stays where it is, and
    each leaver's place in the first len(keep) is taken by a kept row from past them."""
    size = len(keep)
    stay = {i for i in keep if i < size}
    holes = [p for p in range(size) if p not in stay]
    movers = [i for i in keep if i >= size]
    order = list(range(size))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return order
