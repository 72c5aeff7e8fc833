"""The one place where engine events cross from the engine thread into asyncio.

Each request gets an asyncio queue; the engine publishes a whole step's events
with a single `call_soon_threadsafe`, and a request that stops listening
before its final event is aborted in the engine, so no row is left dangling.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .engine import Engine
from .request import GenerationRequest, TokenEvent


class StreamHub:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queues: dict[str, asyncio.Queue[TokenEvent]] = {}
        self.engine: Engine | None = None

    def publish(self, events: list[TokenEvent]) -> None:
        """Called from the engine thread."""
        if events:
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            queue = self._queues.get(event.request_id)
            if queue is not None:  # None: the listener left and its abort is on the way
                queue.put_nowait(event)

    async def run(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit `request` and yield its events up to and including the final one."""
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            self.engine.submit(request)
            while not finished:
                event = await queue.get()
                finished = event.final
                yield event
        finally:
            del self._queues[request.request_id]
            if not finished:
                self.engine.abort(request.request_id)

    @property
    def num_open(self) -> int:
        return len(self._queues)
