"""Request bodies, as pydantic models: a bad field is refused before any handler runs, by name.

Types and the fixed ranges live here (top_p in (0, 1]); the operator's caps (STORYGEN_MAX_LENGTH
and the rest) are checked by the service with the same one-line errors the chat front-ends
show, so the API and chat agree on what is allowed. Unknown fields are refused: a typo such
as "temprature" would otherwise be silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from bot.commands import MAX_INPUT_CHARS
from storygen.sampling import SEED_MAX

Text = Annotated[str, Field(min_length=1, max_length=MAX_INPUT_CHARS)]
MAX_PROMPT_IDS = 32_768  # a token-id prompt's length, before the model's own limit is checked
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
GenreName = Annotated[str, Field(min_length=1, max_length=100, description="a genre name or alias, or auto")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Sampling(_Body):
    """The story settings a request may override; unset ones come from the caller's saved settings."""

    length: int | None = Field(None, ge=1, description="new tokens to write at most (up to the operator's cap)")
    temperature: float | None = Field(None, ge=0, description="0 is greedy; up to the operator's cap")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 turns it off")
    repetition_penalty: float | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="same seed, settings and opening: same story")

    def overrides(self) -> dict[str, object]:
        return {k: v for k, v in self.model_dump(include=set(Sampling.model_fields)).items() if v is not None}


class StoryBody(Sampling):
    """POST /v1/stories."""

    prompt: Text = Field(description="how the story starts")
    genre: GenreName | None = Field(None, description="default: the caller's default genre")
    stream: StrictBool = Field(False, description="true: Server-Sent Events (queue position, text, the story)")


class LegacyInputBody(_Body):
    """POST / as the seeds' Flask API took it: `{"input": "<BOS> <genre> prompt"}`."""

    input: Text


class GenerateBody(_Body):
    """POST /generate, the other seed's shape."""

    prompt: Text
    genre: GenreName | None = None
    length: int | None = Field(None, ge=1)


class CommandBody(_Body):
    """POST /v1/commands: what the playground sends, a chat command as typed, or a button's action."""

    text: Annotated[str, Field(max_length=MAX_INPUT_CHARS + 20)] = ""
    action: Literal["continue", "regenerate", "cancel"] | None = None
    request_id: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_\-]*$")] | None = None


class CompletionBody(_Body):
    """POST /v1/completions, OpenAI's shape. `prompt` is the story's opening; the reply is the rest.

    A prompt of token ids (as vLLM takes them) is read as it is, with no genre framing: that is
    how a StoryBot in front uses this one as its generation server. With API keys configured,
    `user` names the caller's own end user, who then has their own place in the fair queue.

    Beyond OpenAI's fields it takes `genre`, `top_k` and `repetition_penalty`, as vLLM takes
    extra sampling fields. Fields OpenAI has that a story server cannot honour are refused
    when set to anything but their neutral value, never silently dropped.
    """

    model: Annotated[str, Field(min_length=1, max_length=200)]
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Annotated[str, Field(min_length=1, max_length=200)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=4)] | None = None
    stream: StrictBool = False
    stream_options: dict[str, bool] | None = None
    echo: StrictBool = False
    n: int = Field(1, ge=1, le=1, description="one completion per request")
    best_of: int | None = Field(None, ge=1, le=1)
    logprobs: None = Field(None, description="not supported")
    suffix: None = Field(None, description="not supported")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported; use repetition_penalty")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported; use repetition_penalty")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported")
    user: Annotated[str, Field(max_length=200)] | None = None
    genre: GenreName | None = None

    def token_ids(self) -> list[int] | None:
        """The prompt as token ids, when it was sent that way."""
        prompt = self.prompt[0] if self.prompt and isinstance(self.prompt[0], list) else self.prompt
        return prompt if isinstance(prompt, list) and isinstance(prompt[0], int) else None

    def opening(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def overrides(self) -> dict[str, object]:
        values = {"length": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "seed": self.seed}
        return {k: v for k, v in values.items() if v is not None}
