"""Sync and async clients for the tokenloom Generation service.

Both are thin: arguments become a request in `convert`, replies become dataclasses
there too. Failed RPCs are not translated: they propagate as `grpc.RpcError`
(`grpc.aio.AioRpcError` for AsyncClient, a subclass), whose `.code()` says why:
UNAVAILABLE when no server listens at the target, INVALID_ARGUMENT when the server
rejects the request, DEADLINE_EXCEEDED when `timeout` runs out, UNAUTHENTICATED when
the server wants a bearer token (`token=`) that was missing or wrong.

`tls=True` connects over TLS, trusting the system's root certificates, or
`root_certificates` (PEM bytes, e.g. a self-signed server certificate), which implies TLS.

`target` is one address, several (a list, or one string with commas), or a DNS name with many
records (`dns:///name:port`): several replicas are balanced by gRPC's round_robin with health
checking, and a stream broken by a dead replica resumes on another (failover.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from . import convert
from .best_so_far import BestSoFar
from .failover import FailoverStats, Resumption, channel_target, with_seed
from .pb.tokenloom.v1 import generation_pb2 as pb
from .pb.tokenloom.v1.generation_pb2_grpc import GenerationStub
from .types import ChatMessage, GenerationResult, ModelInfo, ScoreResult, StreamChunk

DEFAULT_TARGET = "localhost:50051"

Messages = Iterable[ChatMessage | Mapping[str, str]]
Metadata = Mapping[str, str] | Sequence[tuple[str, str]]


def _call_options(timeout: float | None, metadata: Metadata | None, token: str | None) -> dict[str, Any]:
    """Keyword arguments passed to every RPC; `timeout` bounds a whole stream, not one chunk.
    A `token` becomes the `authorization` metadata, replacing any given in `metadata`."""
    if isinstance(metadata, Mapping):
        metadata = tuple(metadata.items())
    metadata = tuple(metadata or ())
    if token is not None:
        if not token:
            raise ValueError("token must not be empty (pass None for no authentication)")
        metadata = (*((k, v) for k, v in metadata if k.lower() != "authorization"),
                    ("authorization", f"Bearer {token}"))
    return {"timeout": timeout, "metadata": metadata or None}


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    """None for plaintext; TLS when asked for, or when root certificates are given."""
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates)


class Client:
    """Blocking client over one gRPC channel. Use as a context manager or call close().

    generate/stream take exactly one of `prompt` (raw text), `messages` (chat, rendered
    with the model's template) or `input_ids`, plus the HF-named generation parameters
    of the proto's GenerationParameters (max_new_tokens, do_sample, temperature, ...,
    num_beams, length_penalty, early_stopping (False, True or "never"),
    num_return_sequences, repetition_penalty, stop_token_ids, top_n, ...). A parameter
    left None is unset, so the server's default applies; an unknown name or a bad
    value raises TypeError / ValueError before any RPC. Failed RPCs raise grpc.RpcError.

    score takes exactly one of `prompt` / `prompt_ids` and one of `continuation` /
    `continuation_ids`, and returns the continuation's per-token and total log-probs.

    `channel_options` are extra gRPC channel arguments, e.g. ("grpc.max_receive_message_length", n).
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, tls: bool = False,
                 root_certificates: bytes | None = None, token: str | None = None,
                 timeout: float | None = None, metadata: Metadata | None = None,
                 channel_options: Sequence[tuple[str, Any]] = ()) -> None:
        self._options = _call_options(timeout, metadata, token)
        credentials = _credentials(tls, root_certificates)
        target, options, self._balanced = channel_target(target)
        options = [*options, *channel_options]
        self._channel = (grpc.insecure_channel(target, options) if credentials is None
                         else grpc.secure_channel(target, credentials, options))
        self._stub = GenerationStub(self._channel)
        self.failover = FailoverStats()

    def generate(self, prompt: str | None = None, *, messages: Messages | None = None,
                 input_ids: Iterable[int] | None = None, request_id: str = "",
                 **params: Any) -> GenerationResult:
        request = convert.build_request(prompt, messages, input_ids, request_id, params)
        request = with_seed(request) if self._balanced else request
        return convert.to_result(self._stub.GenerateUnary(request, **self._options))

    def stream(self, prompt: str | None = None, *, messages: Messages | None = None,
               input_ids: Iterable[int] | None = None, request_id: str = "",
               **params: Any) -> Iterator[StreamChunk]:
        """Yields chunks as tokens are produced; the last one has finish_reason and usage."""
        # Built here, outside the generator, so bad arguments raise at the call site.
        request = convert.build_request(prompt, messages, input_ids, request_id, params)
        return self._stream(request)

    def _stream(self, request: pb.GenerateRequest) -> Iterator[StreamChunk]:
        resumption = Resumption(request, self.failover, enabled=self._balanced)
        while True:
            call = self._stub.Generate(resumption.request, **self._options)
            best = BestSoFar()
            try:
                for response in call:
                    yield resumption.seen(convert.to_chunk(response, best))
                return
            except grpc.RpcError as exc:
                if resumption.enabled and resumption.finished:
                    return  # the final message arrived before the break: the stream is whole
                if not resumption.retry(exc):
                    raise
                time.sleep(resumption.backoff)
            finally:
                # Leaving the loop early must reach the server as a cancellation; otherwise
                # the request keeps its engine rows until it finishes. A no-op once done.
                call.cancel()

    def score(self, prompt: str | None = None, continuation: str | None = None, *,
              prompt_ids: Iterable[int] | None = None,
              continuation_ids: Iterable[int] | None = None,
              request_id: str = "") -> ScoreResult:
        request = convert.build_score_request(prompt, continuation, prompt_ids,
                                              continuation_ids, request_id)
        return convert.to_score_result(self._stub.Score(request, **self._options))

    def model_info(self) -> ModelInfo:
        return convert.to_model_info(
            self._stub.ModelInfo(convert.model_info_request(), **self._options))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client over one grpc.aio channel; same arguments and errors as Client.

    Create it inside the running event loop. Use `async with` or `await close()`.
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, tls: bool = False,
                 root_certificates: bytes | None = None, token: str | None = None,
                 timeout: float | None = None, metadata: Metadata | None = None,
                 channel_options: Sequence[tuple[str, Any]] = ()) -> None:
        self._options = _call_options(timeout, metadata, token)
        credentials = _credentials(tls, root_certificates)
        target, options, self._balanced = channel_target(target)
        options = [*options, *channel_options]
        self._channel = (grpc.aio.insecure_channel(target, options) if credentials is None
                         else grpc.aio.secure_channel(target, credentials, options))
        self._stub = GenerationStub(self._channel)
        self.failover = FailoverStats()

    async def generate(self, prompt: str | None = None, *, messages: Messages | None = None,
                       input_ids: Iterable[int] | None = None, request_id: str = "",
                       **params: Any) -> GenerationResult:
        request = convert.build_request(prompt, messages, input_ids, request_id, params)
        request = with_seed(request) if self._balanced else request
        return convert.to_result(await self._stub.GenerateUnary(request, **self._options))

    def stream(self, prompt: str | None = None, *, messages: Messages | None = None,
               input_ids: Iterable[int] | None = None, request_id: str = "",
               **params: Any) -> AsyncIterator[StreamChunk]:
        """`async for chunk in client.stream(...)`. To cancel promptly when breaking out
        early, wrap it in `contextlib.aclosing`; otherwise cancellation waits for the
        generator to be collected."""
        request = convert.build_request(prompt, messages, input_ids, request_id, params)
        return self._stream(request)

    async def _stream(self, request: pb.GenerateRequest) -> AsyncIterator[StreamChunk]:
        resumption = Resumption(request, self.failover, enabled=self._balanced)
        while True:
            call = self._stub.Generate(resumption.request, **self._options)
            best = BestSoFar()
            try:
                async for response in call:
                    yield resumption.seen(convert.to_chunk(response, best))
                return
            except grpc.RpcError as exc:
                if resumption.enabled and resumption.finished:
                    return  # the final message arrived before the break: the stream is whole
                if not resumption.retry(exc):
                    raise
                await asyncio.sleep(resumption.backoff)
            finally:
                call.cancel()  # as in Client._stream: an abandoned stream frees its rows

    async def score(self, prompt: str | None = None, continuation: str | None = None, *,
                    prompt_ids: Iterable[int] | None = None,
                    continuation_ids: Iterable[int] | None = None,
                    request_id: str = "") -> ScoreResult:
        request = convert.build_score_request(prompt, continuation, prompt_ids,
                                              continuation_ids, request_id)
        return convert.to_score_result(await self._stub.Score(request, **self._options))

    async def model_info(self) -> ModelInfo:
        return convert.to_model_info(
            await self._stub.ModelInfo(convert.model_info_request(), **self._options))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
