"""Bearer-token authentication: a grpc.aio server interceptor in front of every service.

Health checks and reflection stay open, so load balancers and grpcurl-style tools need no
secret; every other RPC must carry the gRPC metadata `authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import grpc

METADATA_KEY = "authorization"
_SCHEME = "bearer"
# Method paths are "/<package>.<Service>/<Method>": these services answer without a token.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")

MISSING = ("this server requires a bearer token: send the gRPC metadata "
           "'authorization: Bearer <token>' (the token the server got from --auth-token / TOKENLOOM_AUTH_TOKEN)")
REJECTED = "the bearer token in the 'authorization' metadata was not accepted: check the token"
MALFORMED = "the 'authorization' metadata must read 'Bearer <token>'"


def is_open(method: str) -> bool:
    return method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES


def check(metadata: Iterable[tuple[str, str | bytes]] | None, token: bytes) -> str | None:
    """None if `metadata` carries the right bearer token, else why not (the message for the client)."""
    values = [value for key, value in metadata or () if key.lower() == METADATA_KEY]
    if not values:
        return MISSING
    if len(values) > 1:
        return "send one 'authorization' metadata entry, not several"
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, presented = value.strip().partition(" ")
    if scheme.lower() != _SCHEME or not presented.strip():
        return MALFORMED
    # Constant time in the token's contents: a byte-by-byte compare would leak the prefix matched.
    if not hmac.compare_digest(presented.strip().encode(), token):
        return REJECTED
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("the auth token must not be empty")
        self._token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or is_open(handler_call_details.method):
            return handler
        problem = check(handler_call_details.invocation_metadata, self._token)
        return handler if problem is None else _refusing(handler, problem)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    shape = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return shape(refuse, request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
