"""Errors as HTTP answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

OpenAI's clients already know how to show that shape. The message is the same one line a
chat user would read; anything unexpected becomes "Story generation failed (ref 7f3a)", the
ref also in the log beside the traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

from bot.service import NotAllowedError, user_message
from storygen.errors import (ConfigError, DeadlineExceededError, QueueFullError, RequestCancelledError,
                             SettingRangeError, StorygenError, TooManyRequestsError, UnknownGenreError,
                             UnknownSettingError, ValidationError, WorkerUnavailableError)

logger = logging.getLogger(__name__)

# OpenAI fields a story server cannot honour: the reason, instead of pydantic's "Input should be None".
UNSUPPORTED = {
    "logprobs": "logprobs are not supported by this server",
    "suffix": "suffix (insertion) is not supported by this server",
    "presence_penalty": "presence_penalty is not supported; use repetition_penalty (1 to the operator's cap)",
    "frequency_penalty": "frequency_penalty is not supported; use repetition_penalty (1 to the operator's cap)",
    "logit_bias": "logit_bias is not supported by this server",
    "n": "n: this server writes one completion per request (n=1)",
    "best_of": "best_of: this server writes one completion per request (best_of=1)",
}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def to_http_error(error: BaseException, log_context: str = "") -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for an exception a route let out."""
    message = user_message(error, log_context)  # logs the traceback with a ref for anything unexpected
    if isinstance(error, (QueueFullError, TooManyRequestsError)):
        retry = getattr(error, "retry_after_s", 5.0)
        return 429, error_body(message, "rate_limit_error", code="rate_limited"), \
            {"Retry-After": str(max(1, round(retry)))}
    if isinstance(error, WorkerUnavailableError):
        return 503, error_body(message, "unavailable_error", code="unavailable"), {"Retry-After": "5"}
    if isinstance(error, NotAllowedError):
        return 403, error_body(message, "permission_error", code="not_allowed"), {}
    if isinstance(error, (SettingRangeError, UnknownSettingError)):
        return 400, error_body(message, param=getattr(error, "name", None), code="out_of_range"), {}
    if isinstance(error, UnknownGenreError):
        return 400, error_body(message, param="genre", code="unknown_genre"), {}
    if isinstance(error, (ValidationError, ConfigError)):
        return 400, error_body(message), {}
    if isinstance(error, RequestCancelledError):
        return 499, error_body(message, "cancelled", code="cancelled"), {}
    if isinstance(error, DeadlineExceededError):
        return 504, error_body(message, "timeout_error", code="deadline_exceeded"), {}
    if isinstance(error, StorygenError):
        return 500, error_body(message, "server_error"), {}
    return 500, error_body(message, "server_error"), {}


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The first problem as one line naming the field and what is allowed, and the field's name."""
    first = error.errors()[0]
    field, kind, text = _field(tuple(first.get("loc", ()))), first.get("type", ""), first.get("msg", "")
    top = field.split(".")[0]
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({reason})" if reason else "the body is not valid JSON", None
    if top in UNSUPPORTED:
        return UNSUPPORTED[top], top
    if kind == "extra_forbidden":
        return f"unknown field {field!r}; see /docs for the fields this route takes", field
    if kind == "missing":
        return f"{field} is required", field
    if kind in ("model_attributes_type", "dict_type") and field == "body":
        return "the body must be a JSON object", None
    value = first.get("input")
    shown = json.dumps(value)[:40] if isinstance(value, (int, float, str, bool)) or value is None else type(value).__name__
    return f"{field}={shown}: {text[0].lower() + text[1:] if text else 'not allowed'}", field
