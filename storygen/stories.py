"""Requests and results: from what a user asked for to a finished story.

`prepare` checks and resolves a request (opening, genre, settings) into token ids;
`TextStream` turns generated tokens into text as they arrive; `finish` makes the
final story with a clean ending. `generate_story` runs one request start to end
on an engine, for the CLI and tests; the worker does the same for many at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from storygen.config import StorygenConfig
from storygen.endings import finish_story, strip_controls
from storygen.engine import Engine, Sequence
from storygen.steer import steer_ids
from storygen.errors import EmptyPromptError, SettingRangeError
from storygen.genres import Genre, detect_genre, find_genre, is_auto, resolve_genre
from storygen.model import LoadedModel
from storygen.prompts import build_prompt, encode_user_text, to_opening
from storygen.sampling import SamplingParams, validate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoryRequest:
    """One story asked for. Platform-neutral: the worker never sees a chat object."""

    request_id: str
    user_key: str  # "discord:<guild>:<user>", "slack:<team>:<user>", "api:<key>", "cli"
    genre: str  # a genre name or alias as typed, or "auto"
    prompt: str  # the opening, as typed
    params: SamplingParams = SamplingParams()
    deadline: float | None = None  # time.monotonic() by which it must finish; None: the worker's default
    # A prompt already built and encoded elsewhere (a StoryBot in front using this one as its backend,
    # as a completions client sends vLLM token ids): no framing, no genre; the text comes back untrimmed.
    prompt_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PreparedStory:
    request: StoryRequest
    genre: Genre
    opening: str  # cleaned, perhaps trimmed; the story starts with exactly this
    prompt_ids: list[int]
    opening_tokens: int  # the last `opening_tokens` of prompt_ids encode the opening
    notices: tuple[str, ...] = ()  # soft limits applied and guesses made, to tell the user
    steer_ids: tuple[int, ...] = ()  # the genre's word tokens for the genre steer; none for a raw completion

    @property
    def raw(self) -> bool:
        return self.request.prompt_ids is not None

    def sequence(self) -> Sequence:
        """The engine's sequence for this story."""
        return Sequence(self.request.request_id, self.prompt_ids, self.request.params, steer_ids=self.steer_ids)


@dataclass(frozen=True)
class Story:
    request_id: str
    user_key: str
    genre: str
    text: str
    finish_reason: str  # "stop": the model ended it; "length": it ran out of tokens
    new_tokens: int
    seed: int
    notices: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  # ttft_s, total_s, queued_s
    prompt_tokens: int = 0  # the prompt the model read, framing included


def pick_genre(text: str, opening: str, lm: LoadedModel, config: StorygenConfig) -> tuple[Genre, str | None]:
    """The genre to write in, and a notice when it was detected rather than named."""
    allowed = lm.spec.allowed_genres()
    if not is_auto(text):
        genre = resolve_genre(text)
        lm.spec.check_genre(genre)
        return genre, None
    fallback = find_genre(config.default_genre) if not is_auto(config.default_genre) else None
    if fallback not in allowed:
        fallback = allowed[0]
    detection = detect_genre(opening, allowed, fallback)
    return detection.genre, f"genre auto → {detection.explanation}"


def prepare(request: StoryRequest, lm: LoadedModel, config: StorygenConfig) -> PreparedStory:
    """Check a request and turn it into prompt ids; raises a StorygenError a user can read."""
    if request.prompt_ids is not None:
        return _prepare_raw(request, lm, config)
    opening, trimmed = to_opening(request.prompt, config.max_prompt_chars)
    if not opening:
        raise EmptyPromptError()
    validate(request.params, config.limits)
    genre, detected = pick_genre(request.genre, opening, lm, config)
    notices = []
    if trimmed:
        notices.append(f"⚠️ prompt trimmed to {config.max_prompt_chars} characters")
    if detected:
        notices.append(detected)
    prompt_ids = build_prompt(lm.spec, lm.tokenizer, genre, opening, request.params.length)
    room = lm.max_positions - len(prompt_ids)
    if request.params.length > room:
        raise SettingRangeError("length", request.params.length, f"1 to {max(room, 0)} tokens with this opening "
                                "(the model reads at most " f"{lm.max_positions} tokens)")
    opening_tokens = len(encode_user_text(lm.tokenizer, _opening_as_encoded(lm, opening)))
    return PreparedStory(request, genre, opening, prompt_ids, opening_tokens, tuple(notices),
                         steer_ids(lm.tokenizer, genre))


RAW_CONTEXT_TOKENS = 8  # prompt tokens a raw completion's decoding starts from, for spacing


def _prepare_raw(request: StoryRequest, lm: LoadedModel, config: StorygenConfig) -> PreparedStory:
    """A prompt of token ids as a completions client sends it: checked, not framed."""
    ids = list(request.prompt_ids or ())
    if not ids:
        raise EmptyPromptError()
    vocab = len(lm.tokenizer)
    if any(not 0 <= i < vocab for i in ids):
        raise SettingRangeError("prompt", next(i for i in ids if not 0 <= i < vocab),
                                f"token ids from 0 to {vocab - 1} (this model's vocabulary)")
    validate(request.params, config.limits)
    if len(ids) + request.params.length > lm.max_positions:
        raise SettingRangeError("max_tokens", request.params.length,
                                f"1 to {max(lm.max_positions - len(ids), 0)} tokens after this {len(ids)}-token "
                                f"prompt (the model reads at most {lm.max_positions} tokens)")
    genre = find_genre(request.genre) or lm.spec.allowed_genres()[0]
    return PreparedStory(request, genre, "", ids, min(len(ids), RAW_CONTEXT_TOKENS))


def _opening_as_encoded(lm: LoadedModel, opening: str) -> str:
    # genre_tags glues the opening to its tag with a space, which then belongs to the opening's first token.
    return " " + opening if lm.spec.format == "genre_tags" else opening


class TextStream:
    """Generated tokens in, new text out, never splitting a multi-byte character.

    Incremental, as vLLM detokenizes: only a few tokens before the new one are decoded
    each time (enough for the tokenizer to place spaces right), so a token costs the
    same at the end of a long story as at the start.
    """

    _CONTEXT = 5  # tokens decoded before the new ones, for spacing

    def __init__(self, lm: LoadedModel, prepared: PreparedStory) -> None:
        self._tokenizer = lm.tokenizer
        # Start from the opening's tokens: some tokenizers (SentencePiece) drop the leading
        # space of a token decoded alone, so the first new token needs its left context.
        self._ids = prepared.prompt_ids[len(prepared.prompt_ids) - prepared.opening_tokens:]
        self._head = len(self._ids)
        self._read = len(self._ids)  # tokens up to here are emitted
        self._prefix = max(0, self._read - self._CONTEXT)  # decoding starts here
        self.text = ""  # the continuation so far, as emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""  # nothing printable yet, or half a character: wait for the next token
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def final_text(self) -> str:
        """The whole continuation, decoded at once."""
        head = self._decode(self._ids[:self._head])
        full = self._decode(self._ids)
        return full[len(head):] if full.startswith(head) else self._decode(self._ids[self._head:])


def finish(lm: LoadedModel, prepared: PreparedStory, seq: Sequence, stream: TextStream,
           timings: dict[str, float] | None = None) -> Story:
    """The finished story, with a clean ending; raises EmptyStoryError if nothing usable came."""
    return finish_text(lm, prepared, stream.final_text(), seq.finish_reason or "aborted", len(seq.generated),
                       seq.seed, timings)


def finish_text(lm: LoadedModel, prepared: PreparedStory, continuation: str, finish_reason: str, new_tokens: int,
                seed: int, timings: dict[str, float] | None = None) -> Story:
    """The finished story from the text written after the prompt, however it was generated.

    A raw completion (token ids in) comes back as written, control tokens aside: whoever built
    the prompt finishes the story.
    """
    if prepared.raw:
        text = strip_controls(continuation, lm.controls)
    else:
        text = finish_story(prepared.opening, continuation, finish_reason == "stop", lm.controls)
    request = prepared.request
    return Story(request.request_id, request.user_key, prepared.genre.name, text, finish_reason, new_tokens, seed,
                 prepared.notices, timings or {}, len(prepared.prompt_ids))


def generate_story(engine: Engine, prepared: PreparedStory) -> Story:
    """Run one prepared request to the end on an otherwise idle engine."""
    started = time.perf_counter()
    seq = prepared.sequence()
    stream = TextStream(engine.lm, prepared)
    outputs = [engine.start(seq)]
    first = time.perf_counter()
    while True:
        for out in outputs:
            if out.token_id is not None:
                stream.push(out.token_id)
        if seq.done:
            break
        outputs = engine.step()
    timings = {"ttft_s": first - started, "total_s": time.perf_counter() - started}
    return finish(engine.lm, prepared, seq, stream, timings)
