"""Bearer-token authentication: a grpc.aio server interceptor in front of every service.

Health checks and reflection stay open, so load balancers and grpcurl-style tools need no
secret; every other RPC must carry the gRPC metadata `authorization: Bearer <token>`. The token is
checked before the request body is read: a refused call's bytes are never parsed.

Every refusal counts in `tokenloom_auth_failures_total{reason}` (missing, malformed, rejected) and
is logged as a WARNING with the caller's address, at most one line per `LOG_PERIOD` seconds.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable

import grpc

from .throttled_log import ThrottledLog

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
_SCHEME = "bearer"
# Method paths are "/<package>.<Service>/<Method>": these services answer without a token.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")
LOG_PERIOD = 10.0  # seconds between two log lines about refused calls

MISSING = ("this server requires a bearer token: send the gRPC metadata "
           "'authorization: Bearer <token>' (a token of the server's --auth-token, TOKENLOOM_AUTH_TOKEN or "
           "--auth-tokens-file)")
REJECTED = "the bearer token in the 'authorization' metadata was not accepted: check the token"
MALFORMED = "the 'authorization' metadata must read 'Bearer <token>'"
SEVERAL = "send one 'authorization' metadata entry, not several"
# The label of tokenloom_auth_failures_total for each message.
REASONS = {MISSING: "missing", MALFORMED: "malformed", SEVERAL: "malformed", REJECTED: "rejected"}


def is_open(method: str) -> bool:
    return method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, str | None]:
    """(the presented token, None), or (None, why not: MISSING, SEVERAL or MALFORMED)."""
    values = [value for key, value in metadata or () if key.lower() == METADATA_KEY]
    if not values:
        return None, MISSING
    if len(values) > 1:
        return None, SEVERAL
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, presented = value.strip().partition(" ")
    if scheme.lower() != _SCHEME or not presented.strip():
        return None, MALFORMED
    return presented.strip(), None


def check(metadata: Iterable[tuple[str, str | bytes]] | None, token: bytes) -> str | None:
    """None if `metadata` carries the right bearer token, else why not (the message for the client)."""
    return check_with(metadata, one_token(token))


def check_with(metadata: Iterable[tuple[str, str | bytes]] | None, accepts: Callable[[str], bool]) -> str | None:
    """None if `metadata` carries a bearer token that `accepts`, else why not."""
    presented, problem = bearer_token(metadata)
    if problem is None and not accepts(presented):
        problem = REJECTED
    return problem


def one_token(token: bytes) -> Callable[[str], bool]:
    # Constant time in the token's contents: a byte-by-byte compare would leak the prefix matched.
    return lambda presented: hmac.compare_digest(presented.encode(), token)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """`token`: the one token every client sends, or a function that says whether it accepts a token
    (the tokens file's). `on_refusal(reason)` is called once per refused call (the metric)."""

    def __init__(self, token: str | Callable[[str], bool], on_refusal: Callable[[str], None] | None = None):
        if isinstance(token, str):
            if not token:
                raise ValueError("the auth token must not be empty")
            token = one_token(token.encode())
        self._accepts = token
        self._on_refusal = on_refusal
        self._log = ThrottledLog(log, LOG_PERIOD)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or is_open(handler_call_details.method):
            return handler
        problem = check_with(handler_call_details.invocation_metadata, self._accepts)
        return handler if problem is None else self._refusing(handler, problem, handler_call_details.method)

    def _refusing(self, handler: grpc.RpcMethodHandler, message: str, method: str) -> grpc.RpcMethodHandler:
        """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED. It takes
        the body as raw bytes (no deserializer): an unauthenticated caller learns nothing of parsing."""
        reason = REASONS[message]

        async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
            if self._on_refusal is not None:
                self._on_refusal(reason)
            self._log("authentication failed (%s) for %s from %s", reason, method, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        shape = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return shape(refuse, request_deserializer=None, response_serializer=handler.response_serializer)
