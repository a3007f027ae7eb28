"""The HTTP face (Starlette): OpenAI's completions and chat completions, plain or streamed with
server-sent events, /v1/models, /health and /metrics (Prometheus).

A request is checked (API key, body size, JSON, fields, model, context) before it is queued;
then its handler waits for its engine tickets. A client that disconnects, streaming or not,
cancels its requests at once, which frees their batch rows at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gptdeploy.engine import Ticket
from gptdeploy.errors import GptDeployError
from gptdeploy.serve import auth, shapes
from gptdeploy.serve.errors import ApiError, from_library, internal, invalid
from gptdeploy.serve.schemas import Parsed, parse_chat, parse_completion
from gptdeploy.serve.service import Service

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_app(service: Service) -> Starlette:
    """The ASGI app over `service`; its lifespan closes the service when the server stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.service = service
    return app


# -- endpoints ---------------------------------------------------------------------------------


async def completions(request: Request) -> Response:
    return await _generate(request, "completions", parse_completion)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat", parse_chat)


async def models(request: Request) -> Response:
    service = _service(request)
    auth.check(service.config.api_key, request.headers.get("authorization"))
    return JSONResponse(shapes.models(service.model, service.created))


async def health(request: Request) -> Response:
    """200 "ok"; 503 "draining" (shutting down) or "failed" (the engine stopped after a fault)."""
    service = _service(request)
    queued, running = service.engine.occupancy()
    status = "failed" if service.engine.failure else "draining" if service.draining else "ok"
    return JSONResponse(
        {"status": status, "model": service.model, "queued": queued, "running": running},
        status_code=200 if status == "ok" else 503,
    )


async def metrics(request: Request) -> Response:
    service = _service(request)
    auth.check(service.config.api_key, request.headers.get("authorization"))
    data, content_type = service.metrics.render()
    return Response(data, media_type=content_type)


# -- generation --------------------------------------------------------------------------------


async def _generate(request: Request, endpoint: str, parse) -> Response:
    service = _service(request)
    try:
        auth.check(service.config.api_key, request.headers.get("authorization"))
        if service.draining:
            raise ApiError(
                503,
                "the server is shutting down; retry on another replica",
                "service_unavailable",
                code="shutting_down",
            )
        if service.engine.failure is not None:
            raise ApiError(
                503,
                "this server's engine stopped after a fault; retry on another replica",
                "service_unavailable",
                code="engine_failed",
            )
        parsed: Parsed = parse(await _read_json(request, service.config.max_body_bytes))
        service.check_model(parsed.model)
        rid = service.request_id("chatcmpl" if endpoint == "chat" else "cmpl")
        tickets = service.submit(parsed, rid)
    except (ApiError, GptDeployError) as exc:
        error = exc if isinstance(exc, ApiError) else from_library(exc, _prompt_field(endpoint))
        service.metrics.answered(endpoint, str(error.status))
        raise error from None
    chunks = shapes.Chunks(rid, service.model, endpoint == "chat")
    if parsed.stream:
        return _EventStream(
            _events(service, endpoint, parsed, tickets[0], chunks),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, "X-Request-Id": rid},
        )
    return await _answer(request, service, endpoint, parsed, tickets, rid)


async def _answer(
    request: Request, service: Service, endpoint: str, parsed: Parsed, tickets: list[Ticket], rid: str
) -> Response:
    outcome = "cancelled"
    try:
        results = await _results(request, tickets)
        if results is None:  # the client left; nobody reads this
            return Response(status_code=499)
        audit = [await service.audit_record(t, parsed) for t in tickets]
        outcome = "ok"
    except GptDeployError as exc:
        error = from_library(exc, _prompt_field(endpoint))
        outcome = str(error.status)
        raise error from None
    finally:
        for t in tickets:
            t.cancel()  # a no-op for finished ones; frees the rows of a cancelled handler
        service.metrics.answered(endpoint, outcome)  # tokens: when each ticket ends (Service.submit)
    if endpoint == "chat":
        body = shapes.chat_completion(rid, service.model, results[0], audit[0])
    else:
        body = shapes.completion(rid, service.model, results, audit)
    headers = {"X-Request-Id": rid}
    if audit[0] is not None:
        headers["X-Audit-Record"] = ",".join(f"{a['index']}:{a['sha256']}" for a in audit)
    return JSONResponse(body, headers=headers)


async def _results(request: Request, tickets: list[Ticket]):
    """Every ticket's result; None when the client disconnects first."""
    waiter = asyncio.ensure_future(asyncio.gather(*(t.await_result() for t in tickets)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        return waiter.result() if waiter in done else None
    finally:
        for task in (waiter, gone):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, GptDeployError):
            await waiter


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: nothing else arrives before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """A StreamingResponse that closes its body generator when the response ends, however it ends.
    A client that leaves makes Starlette stop at a failed `send` with the generator suspended at a
    `yield`; left alone, its `finally` (free the engine row, count the outcome) runs only when the
    garbage collector reaches the abandoned generator, seconds later on an idle server."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _events(service: Service, endpoint: str, parsed: Parsed, ticket: Ticket, chunks: shapes.Chunks):
    """The SSE body. Starlette cancels it when the client disconnects: the finally cancels the ticket."""
    outcome = "cancelled"
    try:
        if (start := chunks.start()) is not None:
            yield start
        async for piece in ticket.apieces():
            yield chunks.piece(piece)
        audit = await service.audit_record(ticket, parsed)
        yield chunks.finish(ticket.result, audit)
        if parsed.include_usage:
            yield chunks.usage(ticket.result)
        yield shapes.DONE
        outcome = "ok"
    except Exception as exc:  # after the 200 went out: the error travels as an event
        if isinstance(exc, GptDeployError):
            error = from_library(exc, _prompt_field(endpoint))
        else:
            log.error("stream %s failed", chunks.rid, exc_info=exc)
            error = internal()
        outcome = str(error.status)
        yield shapes.error_event(error.body())
    finally:
        ticket.cancel()
        service.metrics.answered(endpoint, outcome)


async def _read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _too_large(limit)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise _too_large(limit)
    try:
        return json.loads(bytes(data), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN/Infinity, too deep
        raise invalid(
            f"the request body is not valid JSON: {' '.join(str(exc).split())[:200]}", code="invalid_json"
        ) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large"
    )


def _prompt_field(endpoint: str) -> str:
    return "messages" if endpoint == "chat" else "prompt"


def _service(request: Request) -> Service:
    return request.app.state.service


# -- error responses: every one in OpenAI's shape ---------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return await _api_error(
        request,
        ApiError(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            kind,
            headers=dict(exc.headers or {}),
        ),
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    error = internal()
    return JSONResponse(error.body(), status_code=error.status)
