"""The one place where engine events cross from the engine thread into asyncio.

Each request gets an asyncio queue; the engine publishes a whole step's events
with a single `call_soon_threadsafe`, and a request that stops listening
before its final event is aborted in the engine, so no row is left dangling.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Protocol

from ..metrics import Metrics
from ..request import GenerationRequest, TokenEvent


class EngineInbox(Protocol):
    """What the hub needs of the engine: take a request in, drop one."""

    def submit(self, request: GenerationRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...


class StreamHub:
    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics | None = None):
        self._loop = loop
        self.metrics = metrics or Metrics()
        # Each event travels with the time its step reached the loop.
        self._queues: dict[str, asyncio.Queue[tuple[float, TokenEvent]]] = {}
        self.engine: EngineInbox | None = None

    def publish(self, events: list[TokenEvent]) -> None:
        """Called from the engine thread."""
        if events:
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()  # one stamp per step: a request's samples in one step share it
        for event in events:
            queue = self._queues.get(event.request_id)
            if queue is not None:  # None: the listener left and its abort is on the way
                queue.put_nowait((now, event))

    async def run(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit `request` and yield its events up to and including the final one.

        Records what its client sees: time to first output, the gaps between the
        steps that gave it output, end-to-end latency, and its token counts.
        """
        queue: asyncio.Queue[tuple[float, TokenEvent]] = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = submitted = False
        timed = request.score_from is None  # scoring has no tokens to wait for
        last_output: float | None = None
        generated = 0
        try:
            self.engine.submit(request)
            submitted = True
            while not finished:
                stamp, event = await queue.get()
                finished = event.final
                if timed and (event.token_ids or event.provisional):
                    generated += len(event.token_ids)
                    if last_output is None:
                        self.metrics.first_token(stamp - request.arrival_time)
                    elif stamp != last_output:
                        self.metrics.inter_token(stamp - last_output)
                    last_output = stamp
                if finished:
                    self.metrics.end_to_end(stamp - request.arrival_time)
                yield event
        finally:
            del self._queues[request.request_id]
            if submitted:
                self.metrics.tokens(prompt=len(request.prompt_ids), generated=generated)
            if not finished:
                self.engine.abort(request.request_id)
