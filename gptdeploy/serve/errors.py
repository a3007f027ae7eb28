"""Every error the server answers, as OpenAI shapes it: {"error": {"message", "type", "param",
"code"}} with a 4xx status (5xx only for the server's own state), never a traceback. Library
errors (GptDeployError) become ApiErrors here, and only here.

    400 invalid_request_error  malformed JSON, unknown fields, unsupported features, a prompt or
                               max_tokens that does not fit the context (code context_length_exceeded)
    401 authentication_error   missing or wrong API key
    404 not_found_error        unknown model (code model_not_found) or path
    413 invalid_request_error  request body over the limit (code request_too_large)
    422 invalid_request_error  a field of the wrong type or out of its range (param names it)
    429 rate_limit_error       the queue is full (with Retry-After)
    503 service_unavailable    shutting down; 504 timeout: the per-request timeout passed
"""

from __future__ import annotations

from gptdeploy.errors import ContextOverflowError, GptDeployError, QueueFullError, RequestAborted

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


def from_library(exc: GptDeployError, param: str | None = None) -> ApiError:
    """The response for a library error raised while checking or running a request."""
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
        return ApiError(400, message, param=param or "max_tokens", code="context_length_exceeded")
    return ApiError(400, message, param=param)


INTERNAL = ApiError(
    500, "the server failed on this request; its log has the details", "server_error", code="internal_error"
)
