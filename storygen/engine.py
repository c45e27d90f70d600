"""The batched decoder: many stories share one forward pass per token.

This is continuous batching in eager PyTorch. A sequence joins the running batch at
the next step when a slot is free (it is prefilled alone, then its KV cache is
left-padded into the batch's), and leaves the moment it finishes. Each row keeps
its own temperature, top_p, top_k, repetition penalty, length and random stream.

Why our own loop rather than transformers' continuous-batching manager: the manager
takes one GenerationConfig for all requests, so per-row settings and per-row seeds
are impossible, and it owns its own scheduler, where we need a fair per-user queue
in front (see worker.py). We still use the library for the model, its DynamicCache
and its attention masking; only the loop is ours.

The engine is synchronous and single-threaded: the worker calls `step()` from its
engine thread, the CLI calls it directly.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from storygen.kvcache import new_cache, replace_layer, truncate_layer
from storygen.model import LoadedModel
from storygen.sampling import RowKnobs, SamplingParams, sample_next

logger = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One story being generated: its prompt, settings and the tokens so far."""

    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int = -1  # the seed in use; drawn at random when params.seed is None
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop" (end-of-story token), "length", "aborted"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepOutput:
    """What one step did for one sequence: a new token, and whether it finished."""

    seq_id: str
    token_id: int | None  # None when the sequence finished without a new token (aborted)
    finish_reason: str | None


class SequenceError(Exception):
    """A failure that belongs to one sequence only (its prefill failed)."""

    def __init__(self, seq_id: str, error: BaseException) -> None:
        super().__init__(f"{seq_id}: {error!r}")
        self.seq_id = seq_id
        self.error = error


class Engine:
    """Owns the model's running batch. Not thread-safe: one thread calls it."""

    def __init__(self, lm: LoadedModel, max_batch: int, append_cache: bool = True) -> None:
        self.lm = lm
        self.max_batch = max_batch
        self.append_cache = append_cache  # in-place KV appends (kvcache.py); False: transformers' torch.cat
        self.rows: list[Sequence] = []  # the running batch, in cache order
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=lm.device)  # (B, T): 0 where left-padded
        self._padded = False  # any zero in _mask; lets batch-1 and aligned batches skip the mask
        self._positions = torch.zeros(0, dtype=torch.long, device=lm.device)  # (B,) next position id per row
        self._next = torch.zeros(0, dtype=torch.long, device=lm.device)  # (B,) last sampled token, fed next
        self._seen = torch.zeros(0, lm.vocab_size, dtype=torch.bool, device=lm.device)  # (B, V) for the penalty
        self._knobs: RowKnobs | None = None
        self._penalise = False  # some row has a repetition penalty, so `_seen` is used

    # --- admission and removal ---------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch - len(self.rows))

    @torch.inference_mode()
    def start(self, seq: Sequence) -> StepOutput:
        """Prefill one sequence, sample its first token, and add it to the running batch."""
        if seq.generator is None:
            seq.seed = seq.params.seed if seq.params.seed is not None else secrets.randbits(32)
            seq.generator = torch.Generator(device=self.lm.device).manual_seed(seq.seed)
        try:
            out = self._prefill(seq)
        except Exception as error:
            raise SequenceError(seq.seq_id, error) from error
        return out

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
        logits = self._forward_decode()  # (B, V)
        # 2. Sample the next token of every row with that row's settings and generator.
        tokens = sample_next(logits, self._knobs, self._seen_or_none(), [s.generator for s in self.rows])
        # 3. Record it, and decide which rows are done.
        outputs = [self._record(seq, tok) for seq, tok in zip(self.rows, tokens.tolist())]
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
        if len(seq.generated) >= seq.params.length:
            seq.finish_reason = "length"
        return StepOutput(seq.seq_id, token, seq.finish_reason)

    def _forward_decode(self) -> torch.Tensor:
        B = len(self.rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], dim=1)  # (B, T+1)
        length = self._cache.get_seq_length()
        try:
            out = self.lm.model(
                input_ids=self._next[:, None],  # (B, 1)
                attention_mask=self._mask if self._padded else None,
                position_ids=self._positions[:, None],  # (B, 1): rows sit at different positions
                past_key_values=self._cache,
                use_cache=True,
            )
        except BaseException:
            self._mask = self._mask[:, :-1]
            self._crop(length)  # layers that already grew roll back, so the batch stays consistent
            raise
        self._positions = self._positions + 1
        return out.logits[:, -1, :]  # (B, V)

    def _prefill(self, seq: Sequence) -> StepOutput:
        ids = seq.prompt_ids + seq.generated  # a preempted sequence resumes with what it wrote
        if len(ids) + seq.params.length - len(seq.generated) > self.lm.max_positions:
            raise ValueError(f"prompt of {len(ids)} tokens plus {seq.params.length} new ones exceeds the "
                             f"model's {self.lm.max_positions} positions")
        device = self.lm.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, L)
        cache = new_cache(self.lm.model.config) if self.append_cache else DynamicCache(config=self.lm.model.config)
        out = self.lm.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seen = torch.zeros(1, self.lm.vocab_size, dtype=torch.bool, device=device)
        seen[0, input_ids[0]] = True
        knobs = RowKnobs.from_params([seq.params], self.lm.vocab_size, device)
        token = sample_next(out.logits[:, -1, :], knobs, seen if seq.params.repetition_penalty != 1 else None,
                            [seq.generator])
        output = self._record(seq, int(token[0]))
        if not seq.done:
            seen[0, token] = True
            self._join(seq, cache, len(ids), token, seen)
        return output

    # --- batch bookkeeping ---------------------------------------------------------------------

    def _join(self, seq: Sequence, cache: DynamicCache, length: int, token: torch.Tensor, seen: torch.Tensor) -> None:
        """Add a prefilled row: left-pad whichever side is shorter so the cache lines up."""
        T = self._mask.shape[1]
        width = max(T, length)
        if self._cache is None:
            self._cache = cache
        else:
            for mine, theirs in zip(self._cache.layers, cache.layers):
                replace_layer(mine, torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], dim=0),
                              torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], dim=0))
        row_mask = self._mask.new_ones(1, length)
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(row_mask, width, dim=1)], dim=0)
        self._padded = self._padded or T != length
        self._positions = torch.cat([self._positions, self._positions.new_tensor([length])])
        self._next = torch.cat([self._next, token.view(1)])
        self._seen = torch.cat([self._seen, seen])
        self.rows.append(seq)
        self._set_knobs()

    def _keep(self, keep: list[int]) -> None:
        """Shrink the batch to the rows at `keep`, then drop padding no row needs any more."""
        if not keep:
            self.rows, self._cache, self._knobs = [], None, None
            self._mask = self._mask[:0, :0]
            self._positions, self._next, self._seen = self._positions[:0], self._next[:0], self._seen[:0]
            self._padded = False
            return
        index = torch.tensor(keep, device=self.lm.device)
        self.rows = [self.rows[i] for i in keep]
        self._mask, self._positions = self._mask[index], self._positions[index]
        self._next, self._seen = self._next[index], self._seen[index]
        self._set_knobs()
        first = int(self._mask.any(dim=0).to(torch.int8).argmax())  # columns before it: padding in every row
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            replace_layer(layer, layer.keys[index, :, first:], layer.values[index, :, first:])
        self._padded = not bool(self._mask.all())

    def _set_knobs(self) -> None:
        self._knobs = RowKnobs.from_params([s.params for s in self.rows], self.lm.vocab_size, self.lm.device)
        self._penalise = any(s.params.repetition_penalty != 1 for s in self.rows)

    def _crop(self, length: int) -> None:
        for layer in self._cache.layers:
            truncate_layer(layer, length)

    def _seen_or_none(self) -> torch.Tensor | None:
        return self._seen if self._penalise else None


def _pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad `x` on the left along `dim` up to `width`."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
