"""How one streamed call ended, as its client saw it: the tokens it got, and the error if it failed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import grpc

from tokenloom_client import AsyncClient


@dataclass
class StreamOutcome:
    ids: list[int]
    error: grpc.aio.AioRpcError | None  # None: the stream completed
    ended_at: float  # time.monotonic() when the call ended


async def collect(client: AsyncClient, request: dict, started: asyncio.Event | None = None,
                  release: asyncio.Event | None = None) -> StreamOutcome:
    """Stream `request` to its end; `started` is set at the first token, and with `release` the
    reader then waits for it before reading on (with a small window, the stream's rows pause)."""
    ids = []
    try:
        async with contextlib.aclosing(client.stream(**request)) as chunks:
            async for chunk in chunks:
                ids += chunk.token_ids
                if started is not None and ids and not started.is_set():
                    started.set()
                    if release is not None:
                        await release.wait()
    except grpc.aio.AioRpcError as exc:
        return StreamOutcome(ids, exc, time.monotonic())
    return StreamOutcome(ids, None, time.monotonic())
