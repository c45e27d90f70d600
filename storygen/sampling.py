"""Sampling settings, their allowed ranges, and the batched next-token sampler.

The knobs are the seeds' knobs (length, temperature, top_p, top_k,
repetition_penalty) plus greedy decoding and a seed. Every row of a batch keeps
its own values: `sample_next` applies them all at once, as tensors.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from storygen.errors import SettingRangeError, UnknownSettingError
from storygen.transfer import to_device

if TYPE_CHECKING:
    from storygen.kernels import Sampler

logger = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one story is sampled. Ranges are checked by `validate`."""

    length: int = 200  # new tokens to generate at most; 1..limits.max_length
    temperature: float = 0.8  # logits / T; 0 means greedy; 0..limits.max_temperature
    top_p: float = 0.95  # keep the smallest set of tokens whose probability reaches p; (0, 1]
    top_k: int = 50  # keep the k likeliest tokens; 0 turns it off; 0..limits.max_top_k
    repetition_penalty: float = 1.1  # CTRL-style penalty on tokens already seen; 1 is off; 1..limits.max_repetition_penalty
    greedy: bool = False  # always take the likeliest token (ignores temperature, top_p, top_k)
    seed: int | None = None  # same seed, same settings, same prompt: same story; 0..2**32-1

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass(frozen=True)
class SamplingLimits:
    """The operator's caps; every request, default and per-user setting is checked against them."""

    max_length: int = 400
    max_temperature: float = 2.0
    max_top_k: int = 200
    max_repetition_penalty: float = 2.0


# The names a user may set, in the order they are shown.
USER_SETTINGS = ("length", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def allowed_range(name: str, limits: SamplingLimits) -> str:
    """The allowed range of one setting, as a user reads it."""
    return {
        "length": f"1 to {limits.max_length} tokens",
        "temperature": f"0 to {limits.max_temperature:g} (0 means greedy)",
        "top_p": "greater than 0, up to 1",
        "top_k": f"0 to {limits.max_top_k} (0 turns it off)",
        "repetition_penalty": f"1 to {limits.max_repetition_penalty:g} (1 turns it off)",
        "seed": f"0 to {SEED_MAX}",
        "greedy": "true or false",
    }[name]


def _in_range(name: str, value: float, limits: SamplingLimits) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    checks = {
        "length": lambda v: 1 <= v <= limits.max_length,
        "temperature": lambda v: 0 <= v <= limits.max_temperature,
        "top_p": lambda v: 0 < v <= 1,
        "top_k": lambda v: 0 <= v <= limits.max_top_k,
        "repetition_penalty": lambda v: 1 <= v <= limits.max_repetition_penalty,
        "seed": lambda v: 0 <= v <= SEED_MAX,
    }
    return checks[name](value)


def validate(params: SamplingParams, limits: SamplingLimits) -> SamplingParams:
    """Return `params` unchanged, or raise naming the first setting out of range. Never clamps."""
    for name in USER_SETTINGS:
        value = getattr(params, name)
        if value is None:
            continue
        if not _in_range(name, value, limits):
            raise SettingRangeError(name, value, allowed_range(name, limits))
    return params


def parse_setting(name: str, raw: str) -> int | float | bool:
    """Turn a user's `name=value` text into a typed value, without range checks."""
    kinds = {f.name: f.type for f in fields(SamplingParams)}
    if name not in kinds:
        raise UnknownSettingError(name, USER_SETTINGS)
    text = raw.strip()
    try:
        if name == "greedy":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if name in ("length", "top_k", "seed"):
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    except ValueError:
        kind = "a whole number" if name in ("length", "top_k", "seed") else "a number"
        raise SettingRangeError(name, raw, f"{kind}, {allowed_range(name, SamplingLimits())}") from None


# Steering towards an ending. Over the last END_WINDOW share of a row's length (at least
# END_WINDOW_MIN tokens), whenever the row's own text stands at the end of a sentence, its
# end-of-story logits are raised by a bias that grows linearly to END_BOOST at the last token.
# The model may still go on, but it becomes ever likelier to end where a sentence ends than to be
# cut off mid-story by the length. END_BOOST = 0 turns steering off.
END_WINDOW = 0.35  # share of the length; (0, 1]
END_WINDOW_MIN = 16  # tokens
END_BOOST = 10.0  # logits (nats); at 10 an end token 1/10000 as likely as the top one becomes about 2x likelier


def ending_bias(generated: torch.Tensor, length: torch.Tensor, at_sentence_end: torch.Tensor) -> torch.Tensor:
    """(B,) logit bias for each row's end-of-story tokens at this step.

    generated: (B,) long, tokens each row has written so far (the one sampled now is the next);
    length: (B,) long, each row's budget; at_sentence_end: (B,) bool, its text ends a sentence now.
    """
    length = length.float()
    window = (length * END_WINDOW).clamp(min=END_WINDOW_MIN)  # (B,)
    progress = ((generated.float() + 1 - (length - window)) / window).clamp(0, 1)  # (B,) 1 at the last token
    return END_BOOST * progress * at_sentence_end.float()


@dataclass
class RowKnobs:
    """Per-row sampling settings of a batch, as (B,) tensors for `sample_next`."""

    temperature: torch.Tensor  # (B,) float; 1.0 for greedy rows, which skip sampling
    top_k: torch.Tensor  # (B,) long; vocab size where top_k is off
    top_p: torch.Tensor  # (B,) float
    penalty: torch.Tensor  # (B,) float
    greedy: torch.Tensor  # (B,) bool
    length: torch.Tensor  # (B,) long; the row's budget of new tokens, for ending_bias
    # What sample_next decides on, known on the host rather than read at every step: on a GPU each read
    # waits for the device. from_params has them at hand; otherwise they are read from the tensors once.
    greedy_rows: tuple[bool, ...] | None = None
    max_top_k: int | None = None

    def __post_init__(self) -> None:
        if self.greedy_rows is None:
            self.greedy_rows = tuple(self.greedy.tolist())
        if self.max_top_k is None:
            self.max_top_k = int(self.top_k.max()) if self.top_k.numel() else 0

    @classmethod
    def from_params(cls, params: list[SamplingParams], vocab: int, device: torch.device) -> RowKnobs:
        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)

        top_k, greedy = [p.top_k if p.top_k > 0 else vocab for p in params], [p.is_greedy for p in params]
        return cls(
            temperature=col([1.0 if p.is_greedy else p.temperature for p in params], torch.float32),
            top_k=col(top_k, torch.long),
            top_p=col([p.top_p for p in params], torch.float32),
            penalty=col([p.repetition_penalty for p in params], torch.float32),
            greedy=col(greedy, torch.bool),
            length=col([p.length for p in params], torch.long),
            greedy_rows=tuple(greedy),
            max_top_k=max(top_k, default=0),
        )


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor, sparse: bool) -> torch.Tensor:
    """The repetition penalty (CTRL) on logits (B, V), in place where sparse: each row's seen tokens
    (seen: (B, V) bool) shrink towards "less likely" by its factor (penalty: (B,)). Returns the logits.

    sparse: only the seen tokens are touched, a few hundred a row, found by `nonzero`, which on a GPU
    waits for the device to count them; dense: every logit passes through a `where`, the same values
    with no wait. The CPU takes the sparse way, a GPU the dense one.
    """
    if sparse:
        rows, cols = seen.nonzero(as_tuple=True)  # (N,), (N,)
        values, factor = logits[rows, cols], penalty[rows]
        logits[rows, cols] = torch.where(values > 0, values / factor, values * factor)
        return logits
    factor = penalty[:, None]  # (B, 1)
    return torch.where(seen, torch.where(logits > 0, logits / factor, logits * factor), logits)


def sample_next(
    logits: torch.Tensor,
    knobs: RowKnobs,
    seen: torch.Tensor | None,
    generators: list[random.Random],
    end_ids: torch.Tensor | None = None,
    end_bias: torch.Tensor | None = None,
    inplace: bool = False,
    sampler: Sampler | None = None,
    sparse_penalty: bool | None = None,
) -> torch.Tensor:
    """Pick one next token per row, each row with its own settings and random stream.

    logits: (B, vocab) for the last position; seen: (B, vocab) bool, tokens already in
    each row (prompt included, as `generate` does), or None when no row penalises.
    end_ids: (E,) long, the end-of-story tokens, each once; end_bias: (B,) float, added to their
    logits (see ending_bias), or None. inplace: fp32 `logits` may be changed (the caller is done
    with them), which saves a copy. sampler: our C kernel for steps 1-3 on a CPU (kernels.Sampler),
    or None. sparse_penalty: how `penalise` goes about it; None: sparse on a CPU, dense elsewhere.
    Returns (B,) token ids. The order of the steps is the order `generate` uses, with the ending
    steer after the penalty.

    Each step touches only what it changes: a row has a few hundred seen tokens of a vocabulary of
    tens of thousands, and temperature is applied to the top-k candidates rather than to the whole
    row (dividing by T > 0 keeps the order), so a 16-row step of a 49k vocabulary passes over the
    logits about three times (copy, argmax for greedy rows, top-k) where it was ten; with the
    kernel, once.
    """
    logits = logits.float()  # (B, V); sampling in fp32 even when the model runs in half precision
    B, V = logits.shape
    steer = end_bias is not None and end_ids is not None and end_ids.numel()
    # The candidates: K the largest k in the batch (a row with a smaller k masks the tail of its
    # candidates); only greedy rows: the best one.
    K = 1 if all(knobs.greedy_rows) else knobs.max_top_k
    if sampler is not None and sampler.fits(logits, K, seen):
        # 1-3 below in one pass of our kernel: the penalty, the steer and the top-K candidates.
        cand_logits, cand_ids = sampler(logits if inplace else logits.clone(), seen, knobs.penalty,
                                        end_ids if steer else None, end_bias if steer else None, K)
        greedy_ids = cand_ids[:, 0] if any(knobs.greedy_rows) else None  # (B,) argmax: the first of the best
        if all(knobs.greedy_rows):
            return greedy_ids
    else:
        if not inplace and (seen is not None or steer):
            logits = logits.clone()
        # 1. Repetition penalty (CTRL): seen tokens' logits shrink towards "less likely" by the row's factor.
        if seen is not None:
            sparse = logits.device.type == "cpu" if sparse_penalty is None else sparse_penalty
            logits = penalise(logits, seen, knobs.penalty, sparse)
        # 1b. Steer towards an ending: each row's end-of-story logits rise by its own bias.
        if steer:
            logits[:, end_ids] += end_bias[:, None]
        # 2. Greedy rows are done: the likeliest token.
        greedy_ids = logits.argmax(dim=-1) if any(knobs.greedy_rows) else None  # (B,)
        if all(knobs.greedy_rows):
            return greedy_ids
        # 3. Top-k: work on the K likeliest candidates only. Sorting the whole vocab happens only
        #    when some row turned top-k off.
        cand_logits, cand_ids = torch.topk(logits, K, dim=-1) if K < V else torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(cand_logits.shape[-1], device=logits.device)[None, :]  # (1, K)
    # 4. Temperature: flatten (T > 1) or sharpen (T < 1) each row's distribution.
    cand_logits = (cand_logits / knobs.temperature[:, None]).masked_fill(rank >= knobs.top_k[:, None], float("-inf"))
    # 5. Top-p (nucleus): keep candidates until their cumulative probability reaches p; the first always stays.
    probs = torch.softmax(cand_logits, dim=-1)  # (B, K), sorted descending
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly before each candidate
    probs = probs.masked_fill(before >= knobs.top_p[:, None], 0.0)
    # 6. Sample each row by inverting its CDF at one uniform draw from its own generator. One draw
    #    per row per step whatever the batch's K, so a seed gives the same story in any batch
    #    (torch.multinomial draws once per candidate, and K is the largest top_k in the batch).
    #    The generators are Python's, on the host whatever the device: a draw from a torch generator
    #    is an operation (on a GPU a kernel launch) per row, 123 us a step at 64 rows here, where
    #    these take 10 us and one copy of (B,) floats.
    draws = to_device([0.0 if is_greedy else gen.random() for is_greedy, gen in zip(knobs.greedy_rows, generators)],
                      torch.float32, logits.device)  # (B,) in [0, 1)
    cdf = torch.cumsum(probs, dim=-1)  # (B, K); the last column is the mass top-p kept
    choice = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)  # (B, 1)
    sampled = cand_ids.gather(-1, choice.clamp(max=cand_ids.shape[-1] - 1)).squeeze(-1)  # (B,)
    return sampled if greedy_ids is None else torch.where(knobs.greedy, greedy_ids, sampled)
