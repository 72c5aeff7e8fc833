"""Request bodies that are not a valid message: INVALID_ARGUMENT in one line, one counter, no traceback.

grpc.aio parses a body with the handler's deserializer before the method runs, and an exception
there becomes UNKNOWN with the exception's class in its message and an ERROR traceback in the log.
This interceptor wraps each handler's deserializer so that a body that does not parse becomes a
sentinel, and the method's behaviour so that the sentinel ends the call with INVALID_ARGUMENT.

It goes after the authentication interceptor, so a caller without a valid token is refused
before its body is read.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable

import grpc

from .throttled_log import ThrottledLog

log = logging.getLogger(__name__)

LOG_PERIOD = 10.0  # seconds between two log lines about malformed bodies
MESSAGE = "the request body is not a valid {} message (corrupt or truncated protobuf bytes)"


class _Malformed:
    """What the wrapped deserializer returns for a body it cannot parse."""


_MALFORMED = _Malformed()


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """`on_malformed()` is called once per refused body (the metric)."""

    def __init__(self, on_malformed: Callable[[], None] | None = None):
        self._on_malformed = on_malformed
        self._log = ThrottledLog(log, LOG_PERIOD)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        # Client-streaming methods (none of ours but reflection's) read their requests themselves.
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        if not (inspect.isasyncgenfunction(handler.unary_stream) or inspect.iscoroutinefunction(handler.unary_unary)):
            return handler  # a sync or reader/writer behaviour: left as grpc runs it
        method = handler_call_details.method
        message = MESSAGE.format(method.rsplit("/", 1)[-1] + " request")
        refuse = self._refusal(method, message)
        if handler.response_streaming:
            behaviour = _unary_stream(handler.unary_stream, refuse)
            shape = grpc.unary_stream_rpc_method_handler
        else:
            behaviour = _unary_unary(handler.unary_unary, refuse)
            shape = grpc.unary_unary_rpc_method_handler
        return shape(behaviour, request_deserializer=_tolerant(handler.request_deserializer),
                     response_serializer=handler.response_serializer)

    def _refusal(self, method: str, message: str):
        async def refuse(context: grpc.aio.ServicerContext) -> None:
            if self._on_malformed is not None:
                self._on_malformed()
            self._log("malformed request body for %s from %s: INVALID_ARGUMENT", method, context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        return refuse


def _tolerant(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(body: bytes):
        try:
            return deserializer(body)
        except Exception:  # protobuf's DecodeError, or whatever another deserializer raises
            return _MALFORMED

    return deserialize


def _unary_unary(behaviour, refuse):
    async def call(request, context):
        if request is _MALFORMED:
            await refuse(context)
        return await behaviour(request, context)

    return call


def _unary_stream(behaviour, refuse):
    # An async generator function, as grpc.aio requires to iterate it; `aclosing` ends the servicer's
    # generator when this one ends, so it never outlives the call.
    async def call(request, context):
        if request is _MALFORMED:
            await refuse(context)
        async with contextlib.aclosing(behaviour(request, context)) as responses:
            async for response in responses:
                yield response

    return call
