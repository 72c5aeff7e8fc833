"""The HTTP front: OpenAI's API (completions, chat completions, models), scoring, health, and the
decoding explorer page, as a Starlette app that uvicorn serves in the server's own event loop.

Calls go through the same `Gateway` as gRPC's (preprocessor, validation, admission, stream hub,
request log, outcome metrics with front="http"); `openai_request.py` and `openai_response.py` map bodies and events
to and from OpenAI's JSON. Streams are server-sent events (sse-starlette). A streamed request answers its
HTTP status once admitted, then its events; an error after that arrives as an `error` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import auth, openai_request as oa, openai_response as reply
from .gateway import CallError, Gateway
from .throttled_log import ThrottledLog

log = logging.getLogger(__name__)

EXPLORER_DIR = Path(__file__).with_name("explorer")
PING_SECONDS = 15.0  # an SSE comment line this often keeps idle proxies from closing a long stream

# A CallError's code -> (HTTP status, OpenAI error type).
_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "invalid_request_error"),  # OpenAI's answer for an unknown model (code model_not_found)
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "INTERNAL": (500, "server_error"),
    "CANCELLED": (499, "cancelled"),
}
# HTTP's words for the gRPC front's auth messages (which name gRPC metadata).
_AUTH_MESSAGES = {
    auth.MISSING: "this server requires a bearer token: send the header 'Authorization: Bearer <token>'",
    auth.SEVERAL: "send one Authorization header, not several",
    auth.MALFORMED: "the Authorization header must read 'Bearer <token>'",
    auth.REJECTED: "the bearer token in the Authorization header was not accepted: check the token",
}


class HttpFront:
    """`accepts(token)`: whether a bearer token is accepted (None: no authentication).
    `max_body_bytes`: the largest request body read. `serving`: what /health answers."""

    def __init__(self, gateway: Gateway, served, token_text: Callable[[int], str],
                 accepts: Callable[[str], bool] | None = None, max_body_bytes: int = 4 * 2**20):
        self.gateway = gateway
        self.served = served
        self.token_text = token_text
        self.accepts = accepts
        self.max_body_bytes = max_body_bytes
        self.serving = False
        self.created = int(time.time())
        self._auth_log = ThrottledLog(log, auth.LOG_PERIOD)
        self.app = _CutTolerant(Starlette(routes=[
            Route("/", self.explorer, methods=["GET"]),
            Mount("/static", StaticFiles(directory=EXPLORER_DIR), name="static"),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/score", self.score, methods=["POST"]),
        ], exception_handlers={Exception: _internal_error}))

    # -- plain pages -------------------------------------------------------------------------

    async def explorer(self, request: Request) -> Response:
        return FileResponse(EXPLORER_DIR / "index.html")

    async def health(self, request: Request) -> Response:
        if self.serving:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    async def models(self, request: Request) -> Response:
        refusal = self._refusal(request)
        return refusal or JSONResponse(reply.models(self.served.name, self.served.context_length, self.created))

    # -- generation ------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "Completions", oa.parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "ChatCompletions", oa.parse_chat)

    async def _generate(self, request: Request, method: str, parse) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        run = self._run(method, self._client(request), body, parse)
        chat = method == "ChatCompletions"
        try:
            options, request_id = await anext(run)  # admitted: from here on the answer is 200
        except CallError as exc:
            return _error(exc, chat)
        responder = reply.Responder(options, request_id, self.token_text)
        if options.stream:
            # Closes `run` if the response is never sent (the client left before it started).
            return EventSourceResponse(_sse(run, responder, chat), ping=PING_SECONDS, sep="\n",
                                       background=BackgroundTask(run.aclose))
        try:
            await _unless_disconnected(request, _consume(run, responder))
        except CallError as exc:
            return _error(exc, chat)
        return JSONResponse(responder.response())

    async def _run(self, method: str, client: str, body: object, parse):
        """Yields (options, request id) once admitted, then the request's events."""
        with self.gateway.call(method, "http", client) as call:
            parsed = _parsed(parse, body, self.served.name)
            req = await call.prepare(parsed.user, parsed.raw)
            async with await call.admit(req, req.request_id) as ticket:
                yield parsed.options, req.request_id
                driver = [asyncio.current_task()]  # the task that iterates this generator now

                def cut(code: str, message: str) -> None:  # the client stopped reading: end the response
                    log.info("HTTP stream %s cut: %s", req.request_id, message)
                    driver[0].cancel()

                async with contextlib.aclosing(call.events(req, ticket, cut)) as events:
                    async for event in events:
                        yield event
                        driver[0] = asyncio.current_task()

    # -- scoring -----------------------------------------------------------------------------

    async def score(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        try:
            return await _unless_disconnected(request, self._score(self._client(request), body))
        except CallError as exc:
            return _error(exc)

    async def _score(self, client: str, body: object) -> Response:
        with self.gateway.call("Score", "http", client) as call:
            parsed = _parsed(oa.parse_score, body, self.served.name)
            req = await call.prepare_score(parsed.prompt, parsed.continuation, parsed.continuation_ids)
            ids, logprobs, cached = [], [], 0
            async with await call.admit(req, req.request_id) as ticket:
                async for event in call.events(req, ticket, lambda code, message: None):
                    ids.extend(event.token_ids)
                    logprobs.extend(event.logprobs)
                    cached = event.cached_tokens if event.final else cached
        return JSONResponse(reply.score_response(self.served.name, req.prompt_ids[: req.score_from], ids, logprobs,
                                              len(req.prompt_ids), cached))

    # -- the door: authentication, the body, who the client is ---------------------------------

    async def _body(self, request: Request) -> object | Response:
        """The JSON body, or the response that refuses the call (authentication first: a refused
        caller's body is never read)."""
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return _error_response(413, f"the request body is larger than {self.max_body_bytes} bytes",
                                       "invalid_request_error")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks), parse_constant=_no_constant)
        except ValueError as exc:
            self.gateway.metrics.malformed_request()
            return _error_response(400, f"the request body is not valid JSON: {exc}", "invalid_request_error")

    def _refusal(self, request: Request) -> Response | None:
        if self.accepts is None:
            return None
        problem = auth.check_with(request.headers.items(), self.accepts)
        if problem is None:
            return None
        reason = auth.REASONS[problem]
        self.gateway.metrics.auth_failed(reason)
        self._auth_log("authentication failed (%s) for %s from %s", reason, request.url.path, _peer(request))
        return _error_response(401, _AUTH_MESSAGES[problem], "authentication_error", code="invalid_api_key")

    def _client(self, request: Request) -> str:
        return self.gateway.identify(request.headers.items(), _peer(request))


def _parsed(parse, body: object, served_name: str):
    try:
        return parse(body, served_name)
    except oa.ModelNotFound as exc:
        raise CallError("NOT_FOUND", str(exc), field="model") from None


async def _consume(run, responder: reply.Responder) -> None:
    async with contextlib.aclosing(run):
        async for event in run:
            responder.add(event)


async def _sse(run, responder: reply.Responder, chat: bool):
    """The events as SSE `data:` lines, then `[DONE]`; an error after the start as an `error` event.
    `run` is closed however this ends (its ticket, log line and engine rows go at once, not at GC)."""
    async with contextlib.aclosing(run):
        try:
            async for event in run:
                for chunk in responder.chunks(event):
                    yield json.dumps(chunk, separators=(",", ":"))
        except CallError as exc:
            yield json.dumps(_error_body(exc, chat), separators=(",", ":"))
            return
    yield "[DONE]"


async def _unless_disconnected(request: Request, work):
    """`work`'s result; if the client disconnects first, `work` is cancelled (the call counts as
    cancelled and its rows leave the engine) and so is this."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():  # the client left, or this handler itself is being cancelled
            task.cancel()
    if not task.done() or task.cancelled():  # cancelled above: it ends on its own (counted as cancelled)
        raise asyncio.CancelledError()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _peer(request: Request) -> str:
    """The client's address as gRPC spells peers ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5'), so that
    identity.peer_host names a host the same whichever front it came in by."""
    if request.client is None:
        return "unknown"
    host, port = request.client.host, request.client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _error_body(exc: CallError, chat: bool = False) -> dict:
    _, kind = _STATUS.get(exc.code, (500, "server_error"))
    param = oa.field_name(exc.field, chat) if exc.field else None
    message = f"{param}: {exc.detail}" if exc.code == "INVALID_ARGUMENT" and param else exc.message
    code = exc.limit or ("model_not_found" if exc.code == "NOT_FOUND" else None)  # OpenAI's codes
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(exc: CallError, chat: bool = False) -> Response:
    status, _ = _STATUS.get(exc.code, (500, "server_error"))
    if exc.limit == "too_large":
        status = 400  # no retry helps: the request can never fit
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return JSONResponse(_error_body(exc, chat), status_code=status, headers=headers)


def _error_response(status: int, message: str, kind: str, code: str | None = None) -> Response:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug's answer, in OpenAI's error shape (uvicorn logs the traceback)."""
    return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _CutTolerant:
    """The ASGI app, where a stream cut because its client stopped reading (its task cancelled by
    the stream hub) ends quietly: uvicorn then closes the connection, with no traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the server itself is stopping this task
