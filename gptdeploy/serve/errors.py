"""Every error the server answers, as OpenAI shapes it: {"error": {"message", "type", "param",
"code"}} with a 4xx status (5xx only for the server's own state or faults), never a traceback.
Library errors (GptDeployError) become ApiErrors here, and only here: the caller's mistakes
(GenerationError and its kinds, a full queue) as 4xx with the library's message; everything else
(RuntimeFailure, AuditError, BundleError, ...) is the server's fault: 500 with a generic message,
the detail in the server's log.

    400 invalid_request_error  malformed JSON, unknown fields, unsupported features, a prompt or
                               max_tokens that does not fit the context (code context_length_exceeded)
    401 authentication_error   missing or wrong API key
    404 not_found_error        unknown model (code model_not_found) or path
    413 invalid_request_error  request body over the limit (code request_too_large)
    422 invalid_request_error  a field of the wrong type or out of its range (param names it)
    429 rate_limit_error       the queue is full (with Retry-After)
    500 server_error           the run failed on the server's side (a runtime, NaN logits, the
                               audit log): code internal_error, the detail only in the log
    503 service_unavailable    shutting down, or the engine stopped after a fault (code engine_failed)
    504 timeout_error          the per-request timeout passed
"""

from __future__ import annotations

import logging

from gptdeploy.errors import (
    ContextOverflowError,
    GenerationError,
    GptDeployError,
    QueueFullError,
    RequestAborted,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a decode step is milliseconds; a full queue drains within about a request's time


class ApiError(Exception):
    """An error response: status and OpenAI's error body fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unprocessable(message: str, param: str) -> ApiError:
    return ApiError(422, message, param=param, code="invalid_value")


# The library's option names -> the request fields a client sent.
FIELDS = {"max_new_tokens": "max_tokens"}


def from_library(exc: GptDeployError, prompt_field: str = "prompt") -> ApiError:
    """The response for a library error raised while checking or running a request; `prompt_field`
    is what the endpoint calls the prompt ("messages" for chat)."""
    if not isinstance(exc, (GenerationError, QueueFullError)):  # not the caller's fault
        log.error("request failed on the server's side: %s: %s", type(exc).__name__, exc)
        return internal()
    message = " ".join(str(exc).split()).replace("max_new_tokens", "max_tokens")  # OpenAI's name for it
    if isinstance(exc, QueueFullError):
        return ApiError(
            429, message, "rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    if isinstance(exc, RequestAborted):
        if exc.reason == "timeout":
            return ApiError(504, message, "timeout_error", code="timeout")
        if exc.reason == "shutdown":
            return ApiError(503, message, "service_unavailable", code="shutting_down")
        return ApiError(499, message, "cancelled", code="cancelled")  # no one reads it: the client left
    if isinstance(exc, ContextOverflowError):
        param = {"prompt": prompt_field, **FIELDS}.get(exc.param or "max_new_tokens", exc.param)
        return ApiError(400, message, param=param, code="context_length_exceeded")
    return ApiError(400, message)


def internal() -> ApiError:
    """The server's own fault: a generic message; the detail goes to the log, never to the client."""
    return ApiError(
        500, "the server failed on this request; its log has the details", "server_error", code="internal_error"
    )
